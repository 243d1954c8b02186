// The write session: one owner for everything an image needs while it is
// open for writing (the refcounts and allocator, the dedup index, gathered
// data, the dirty state and the order in which it all reaches the disk).
// ImageState holds a Writer only while the image is writable.
//
// Data is never written in place, and a freed cluster is reused (or its
// space given back to the file system) only after the L2 change that freed
// it is on disk, so after a crash every L2 entry shows old or new data.
// After any failed write or sync the session ends: later calls return the
// same error and the image stays as after a crash (dirty: repaired on the
// next open), since what reached the disk is no longer known.
#pragma once

#include <array>
#include <functional>
#include <unordered_map>
#include <memory>
#include <optional>
#include <unordered_map>
#include <span>
#include <unordered_map>
#include <vector>

#include "dedup/compressed_index.h"
#include "dedup/digest_log.h"
#include "dedup/session_index.h"
#include "image/compressed_packer.h"
#include "image/cluster_set.h"
#include "image/data_writer.h"
#include "image/refcounts.h"
#include "qcow2dedup/image.h"
#include "qcow2dedup/share_limit.h"

namespace qcow2dedup {

class BitmapMarks;
class ImageState;

// Whether we can write images of this format (checked before anything is
// written, repairs included).
Status CheckWritableFormat(const Header& h);

// Writes the header from s.header (cluster 0).
Status WriteHeader(ImageState& s);

inline uint64_t ShareLimit(const Header& h) { return ShareLimit(h.refcount_bits()); }

class Writer {
 public:
  // Readies s, opened read-write, for writing. An image we closed cleanly
  // (the header vouches for its index) is taken as it is: its stored index
  // is searched where it lies, and nothing is read that the writes do not
  // need. Any other image has its structure vetted and its index rebuilt
  // from the data first.
  static Result<std::unique_ptr<Writer>> Start(ImageState& s, uint64_t cache_tables, const ProgressFn& progress);
  ~Writer();

  // mark: the clusters are what the guest wrote, for the persistent
  // bitmaps; false when the caller noted the exact bytes (NoteGuestWrite).
  Status WriteClusters(std::span<const ClusterWrite> clusters, bool mark = true);
  Status NoteGuestWrite(uint64_t offset, uint64_t len);
  // Image::AddBitmaps (bitmap_copy.cpp).
  Status AddBitmaps(const std::vector<PersistentBitmap>& bitmaps);
  // In-place dedup: every stored data cluster hashed anew, every guest
  // cluster whose data is stored more than once linked to one copy (the
  // lowest), all-zero data unmapped; the other copies freed.
  struct DedupCounts {
    uint64_t stored = 0;    // data clusters stored before (the rebuilt index's entries)
    uint64_t relinked = 0;  // guest clusters now pointing at another copy
    uint64_t zeroed = 0;    // guest clusters of zeros no longer stored
    uint64_t unindexed = 0; // stored clusters the index had no room for (index_memory): left as they are
  };
  // flush_interval: flush after every this many bytes of guest space (0: never mid-run).
  Result<DedupCounts> Deduplicate(const ProgressFn& hashing, const ProgressFn& relinking, uint64_t flush_interval = 0);
  Status Resize(uint64_t new_size);
  // Everything so far durable, in the crash-safe order; the image stays dirty.
  Status Flush();
  // Flushes, stores the index's changes and marks the image clean.
  Status Close();

  // Gathered data overlapping [offset, offset + len) goes to the file, so a
  // read sees it.
  Status FlushDataOverlapping(uint64_t offset, uint64_t len);

  const WriteStats& stats() const { return stats_; }
  const SessionIndex& index() const { return index_; }
  // Stored data clusters: the index's, and the compressed ones in use.
  uint64_t stored_clusters() const { return index_.size() + compressed_.size(); }

 private:
  enum class Share { kYes, kNo, kStale };

  Writer(ImageState& s, uint64_t cache_tables);
  Status Prepare(const ProgressFn& progress);
  Status VetStructure();
  // After a clean close: this file, as it is now, is consistent.
  void RememberConsistent();
  Status RebuildIndex(const ProgressFn& progress);
  // The compressed clusters the active L1 references, counted and hashed
  // (by decompressing them) into compressed_ (compressed_writer.cpp).
  Status LoadCompressed();
  // w's entry as a compressed cluster: a stored copy linked (old itself when
  // old already is one), or with w.compress a new one stored; none when w
  // is to be stored uncompressed.
  Result<std::optional<uint64_t>> CompressedEntryFor(const ClusterWrite& w, uint64_t old);
  Result<bool> CanShareCompressed(uint64_t descriptor, const ClusterWrite& w);
  // Whether the compressed copy is in use and every host cluster it touches
  // can take one more reference; AddCompressedReference takes them.
  Result<bool> CompressedHasRoom(uint64_t descriptor);
  Status AddCompressedReference(uint64_t descriptor);
  Status RelinkCompressed(uint64_t guest_cluster, uint64_t old, uint64_t old_bitmap,
                          const std::unordered_map<uint64_t, std::optional<uint64_t>>& moves, DedupCounts& counts);
  Result<uint64_t> StoreCompressed(std::span<const uint8_t> bytes);

  // Runs op; its failure ends the session (and gives back space on ENOSPC).
  Status Guarded(const std::function<Status()>& op);
  void GiveBackSpace();

  Status BeginChange();
  Status WriteOne(const ClusterWrite& w);
  // The L2 table of guest_cluster ready to take a new entry: created if
  // absent, copied if it is shared.
  Status PrepareL2(uint64_t guest_cluster);
  Status CopyL2Table(uint64_t l1_index);
  Status ReadCluster(uint64_t cluster);
  // known: the cluster's digest, when the caller has it (saves a read).
  Status Release(uint64_t cluster, bool data, const Digest* known = nullptr);
  Status ReleaseEntry(uint64_t entry, uint64_t bitmap);
  Result<bool> Believe(uint64_t cluster, const Digest& digest);
  Result<Share> CanShare(uint64_t cluster, const ClusterWrite& w);
  Result<std::optional<uint64_t>> FindShareable(const ClusterWrite& w);
  // Which COPIED changes a fix-up makes. A cleared flag is always safe on
  // disk (it only forces a copy on write); a set one only once no other
  // reference is on disk. Version 2 images (no dirty bit) take them apart.
  enum class CopiedPass { kBoth, kClearOnly, kSetOnly };
  Status FixCopiedFlags(CopiedPass pass = CopiedPass::kBoth);
  // Writes everything back: data, then refcount blocks and L2 tables, then
  // the L1 and refcount tables, then the header; frees become reusable.
  Status FlushState();
  // A flush at a point where no metadata change is half done, when a cache
  // has grown past its capacity.
  Status FlushIfCachesFull();
  // Version 2 (writer_v2.cpp): FlushState in the order that keeps a crash
  // to leaks, since no dirty bit makes anyone repair the image.
  Status FlushStateV2();
  // guest_cluster's entry now links to a cluster others reference; old is
  // the entry it replaced. Version 2 holds such links back in the flush.
  void NoteLink(uint64_t guest_cluster, uint64_t old) {
    if (v2_) held_links_.try_emplace(guest_cluster, old);
  }
  Status PunchFreed(std::vector<uint64_t> clusters);

  ImageState& s_;
  std::unique_ptr<Refcounts> refcounts_;
  DataWriter data_;
  SessionIndex index_;
  CompressedIndex compressed_;
  CompressedPacker packer_;
  std::vector<uint8_t> compress_buf_;
  WriteStats stats_;
  Status failed_;                 // set once a write or sync failed
  bool marked_dirty_ = false;     // the header on disk says dirty, index out of sync
  bool index_changed_ = false;    // the index must be saved at close
  bool header_changed_ = false;   // size or L1 moved: rewrite the header on flush
  ClusterSet copied_fixups_;      // host clusters whose refcount crossed 1
  bool fix_all_copied_ = false;   // recheck COPIED on every L2 entry at the next flush
  bool fix_l1_copied_ = false;    // an L2 table was copied: recheck the L1 entries' COPIED
  // The digests of clusters this session wrote or hashed: what an index
  // match is confirmed against.
  DigestLog digests_;
  bool index_hashed_ = false;     // the index was built from the data by this session
  std::pair<uint64_t, uint64_t> reserved_index_;  // the stored table found at the start: offset, bytes
  // Stores the index, in place or fresh (placed: clusters were allocated
  // for it), and sets the header's extension.
  Status StoreIndex(bool& placed);
  bool closing_ = false;  // in Close: frees past the end are cut, not punched
  // The header's count of duplicates that may be stored for lack of index
  // memory, before this session's unindexed new copies are added.
  uint64_t prior_misses_ = 0;
  std::vector<uint8_t> scratch_;  // one cluster
  std::unique_ptr<BitmapMarks> bitmaps_;  // loaded at the first change
  const bool v2_;                 // a version 2 image: no dirty bit, no autoclear bits, no zero flag
  std::optional<FileStamp> open_stamp_;  // the file's when the session began
  std::unordered_map<uint64_t, uint64_t> held_links_;  // v2: guest cluster -> entry on disk before its link
};

}  // namespace qcow2dedup
