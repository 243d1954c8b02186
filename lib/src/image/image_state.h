// Everything an open qcow2 image holds. Image (the public face) owns one;
// open.cpp, reader.cpp, writer.cpp and create.cpp each work on it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "format/header.h"
#include "format/snapshot.h"
#include "image/cluster_map.h"
#include "image/metadata_map.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup {

// Tables each metadata cache holds: 32 MiB worth by default, like QEMU's
// default L2 cache; at least 4 (tests use that few).
inline uint64_t CacheTables(uint64_t cluster_size, uint64_t cache_bytes) {
  if (cache_bytes) return std::max<uint64_t>(4, cache_bytes / cluster_size);
  return std::max<uint64_t>(64, (32u << 20) / cluster_size);
}

// The directory path names ("." for a bare name): where a relative
// backing file is looked up and where scratch files go.
inline std::string DirectoryOf(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
}

class Writer;

class ImageState {
 public:
  ImageState(std::string path, std::unique_ptr<File> f, Header h);
  ~ImageState();

  std::string path;
  std::unique_ptr<File> file;
  Header header;
  uint64_t file_size = 0;
  MetadataMap meta;
  std::unique_ptr<ClusterMap> map;
  std::unique_ptr<BlockDevice> backing;
  std::string full_backing_path;
  SnapshotTable snapshots;
  bool verify = false;
  uint64_t index_memory = 0;  // OpenOptions::index_memory
  std::unique_ptr<Writer> writer;  // only while open for writing

  // Reader: the last cluster decompressed, keyed by its L2 entry.
  std::vector<uint8_t> decompressed;
  uint64_t decompressed_entry = 0;

  uint64_t cs() const { return header.cluster_size(); }
  // Data the writer still gathers for [offset, offset + len) goes to the
  // file first, so that a read sees it.
  Status FlushPendingData(uint64_t offset, uint64_t len);
};

// Images are made, and their state reached, by the library alone.
class ImageAccess {
 public:
  static std::unique_ptr<Image> Make(std::unique_ptr<ImageState> s) { return std::unique_ptr<Image>(new Image(std::move(s))); }
  static ImageState& State(Image& image) { return *image.state_; }
};

inline ImageState& StateOf(Image& image) { return ImageAccess::State(image); }

}  // namespace qcow2dedup
