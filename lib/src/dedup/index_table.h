// The dedup index as stored in the image: a hash table of 4 KiB buckets in
// refcount-0 clusters, searched where it lies. A lookup reads one bucket
// (rarely a few), and a session writes back only the buckets it changed, so
// a small write into a large image costs what it costs in a small one.
//
// A bucket is {be16 count, u8 overflowed, 5 zero bytes, 8-byte check, then
// 453 entries of {be40 fingerprint (index.h), be32 host cluster}}. An entry
// lives in the bucket its fingerprint's top bits name (HomeBucket) or, when
// that one is full, in the next ones (overflowed set on each full bucket
// passed, and never cleared until the table is rebuilt); so a table is
// written in one pass over the index in memory, which is in fingerprint
// order. The check is the first 8 bytes of the bucket's SHA-256 taken with
// the check zeroed; an all-zero bucket is an empty one (never written, or a
// hole).
//
// The index is advisory and names candidates: the writer hashes a cluster
// the table names before it links to it, so a damaged table, or another
// cluster's fingerprint, costs dedup chances, never data.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <unordered_map>
#include <vector>

#include "dedup/index.h"
#include "format/header.h"
#include "qcow2dedup/file.h"

namespace qcow2dedup {

constexpr uint64_t kIndexBucketBytes = 4096;
constexpr uint64_t kIndexBucketEntries = 453;
constexpr uint64_t kIndexEntryBytes = 9;
// Tables are built at most half full and rebuilt past this many entries a
// bucket, so probe chains stay short.
constexpr uint64_t kIndexBuildLoad = kIndexBucketEntries / 2;
constexpr uint64_t kIndexMaxLoad = kIndexBucketEntries * 7 / 8;

// Buckets for a table built to hold entries.
uint64_t IndexBucketsFor(uint64_t entries);
// Bytes a table of that many buckets takes.
inline uint64_t IndexTableBytes(uint64_t buckets) { return buckets * kIndexBucketBytes; }

// Why the table the extension describes cannot be believed before reading
// it (a hash we do not know, a shape we never write, or a place outside the
// file), or Ok. The one place these rules live: the writer and check.
Status CheckIndexPlacement(const DedupExtension& ext, uint64_t cluster_size, uint64_t file_size);

struct IndexEntry {
  Fingerprint fingerprint;
  uint32_t cluster;
};

// One bucket decoded. ok is false when its check does not match (a torn or
// foreign bucket): it then holds nothing.
struct IndexBucket {
  bool ok = true;
  bool overflowed = false;
  std::vector<IndexEntry> entries;
};
void EncodeIndexBucket(const IndexBucket& b, uint8_t* out);
IndexBucket DecodeIndexBucket(const uint8_t* in);
uint64_t HomeBucket(Fingerprint f, uint64_t buckets);

// The stored table, for lookups and for writing a session's changes back.
class IndexTable {
 public:
  IndexTable(File* file, const DedupExtension& ext);

  uint64_t offset() const { return offset_; }
  uint64_t buckets() const { return buckets_; }
  uint64_t entries() const { return entries_; }
  // Whether a bucket read so far failed its check.
  bool damaged() const { return damaged_; }

  // Visits every host cluster stored under this fingerprint, along its probe
  // chain; f returns false to stop.
  Status ForKey(Fingerprint key, const std::function<bool(uint64_t cluster)>& f);

  // Writes these changes into the buckets in place: removals first, then
  // insertions. Fails, writing nothing, when the table would grow past
  // kIndexMaxLoad, or may_write refuses a changed bucket's place.
  struct Pair {
    Fingerprint fingerprint;
    uint64_t cluster;
  };
  using MayWrite = std::function<Status(uint64_t offset, uint64_t len)>;
  Status Apply(const std::vector<Pair>& removed, const std::vector<Pair>& added, const MayWrite& may_write);

  // Every entry, bucket by bucket (reading the whole table).
  Status ForEach(const std::function<void(Fingerprint key, uint64_t cluster)>& f);

 private:
  Result<const IndexBucket*> Bucket(uint64_t b);

  File* file_;
  uint64_t offset_, buckets_, entries_;
  bool damaged_ = false;
  // Buckets read or changed this session, decoded. A session touches a
  // bucket per distinct digest it looks up, so this stays small for small
  // writes; a bulk write through a stored table is bounded by the table.
  std::unordered_map<uint64_t, IndexBucket> read_;
};

// Buckets of the table WriteIndexTable writes for index (0 if it is empty).
uint64_t IndexTableBuckets(const DedupIndex& index);

// Writes a fresh table holding index at offset (cluster aligned, with
// IndexTableBytes(IndexTableBuckets(index)) free there) and returns the
// extension that describes it.
Result<DedupExtension> WriteIndexTable(File& file, const DedupIndex& index, uint64_t offset);

// Reads a whole stored table into index, if the header vouches for it and
// its placement is sound; false (index empty) when it cannot be believed.
Result<bool> ReadIndexTable(File& file, const Header& h, uint64_t file_size, DedupIndex& index);

}  // namespace qcow2dedup
