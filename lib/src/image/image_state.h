// Everything an open qcow2 image holds. Image (the public face) owns one;
// open.cpp, reader.cpp, writer.cpp and create.cpp each work on it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dedup/index.h"
#include "format/header.h"
#include "format/snapshot.h"
#include "image/cluster_map.h"
#include "image/cluster_set.h"
#include "image/data_writer.h"
#include "image/metadata_map.h"
#include "image/refcounts.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup {

// Tables each cache holds: 32 MiB worth, like QEMU's default L2 cache.
inline uint64_t CacheTables(uint64_t cluster_size) { return std::max<uint64_t>(64, (32u << 20) / cluster_size); }

class ImageState {
 public:
  ImageState(std::string path, std::unique_ptr<File> f, Header h)
      : path(std::move(path)), file(std::move(f)), header(std::move(h)), meta(header), data(file.get()) {}

  std::string path;
  std::unique_ptr<File> file;
  Header header;
  uint64_t file_size = 0;
  MetadataMap meta;
  std::unique_ptr<ClusterMap> map;
  std::unique_ptr<Refcounts> refcounts;  // only when writable
  std::unique_ptr<BlockDevice> backing;
  std::string full_backing_path;
  SnapshotTable snapshots;
  bool writable = false;
  bool verify = false;

  // Reader: the last cluster decompressed, keyed by its L2 entry.
  std::vector<uint8_t> decompressed;
  uint64_t decompressed_entry = 0;

  // Writer.
  DataWriter data;
  DedupIndex index;
  WriteStats stats;
  bool marked_dirty = false;      // the header on disk says dirty, index out of sync
  bool index_changed = false;     // the index must be saved at close
  bool header_changed = false;    // size or L1 moved: rewrite the header on flush
  ClusterSet copied_fixups;       // host clusters whose refcount crossed 1
  bool fix_all_copied = false;    // recheck COPIED on every L2 entry at the next flush
  ClusterSet unverified;          // host clusters whose index entry came from disk, unchecked
  std::vector<uint8_t> scratch;   // one cluster

  uint64_t cs() const { return header.cluster_size(); }
};

}  // namespace qcow2dedup
