#include <sys/stat.h>

#include "image/image_state.h"
#include "image/writer.h"
#include "qcow2dedup/dedup.h"

namespace qcow2dedup {
namespace {

struct FileUse {
  uint64_t size = 0, allocated = 0;
};

FileUse Use(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return {};
  return {uint64_t(st.st_size), uint64_t(st.st_blocks) * 512};
}

}  // namespace

Result<DedupResult> DeduplicateImage(const std::string& path, DedupOptions o) {
  DedupResult r;
  r.filename = path;
  const FileUse before = Use(path);
  OpenOptions open;
  open.writable = true;
  open.cache = o.cache;
  open.file = std::move(o.file);
  open.progress = o.hashing;
  open.metadata_cache_bytes = o.metadata_cache_bytes;
  open.index_memory = o.index_memory;
  QD_ASSIGN_OR_RETURN(auto image, Image::Open(path, std::move(open)));
  Writer& w = *StateOf(*image).writer;
  r.cluster_size = image->cluster_size();
  QD_ASSIGN_OR_RETURN(Writer::DedupCounts counts, w.Deduplicate(o.hashing, o.relinking, o.flush_interval));
  r.stored_before = counts.stored;
  r.relinked = counts.relinked;
  r.zeroed = counts.zeroed;
  r.unindexed = counts.unindexed;
  QD_RETURN_IF_ERROR(image->Close());
  r.freed_clusters = w.stats().freed_clusters;
  r.stored_after = w.stored_clusters() + r.unindexed;  // those are never freed here
  const FileUse after = Use(path);
  r.file_size_before = before.size;
  r.disk_usage_before = before.allocated;
  r.file_size_after = after.size;
  r.disk_usage_after = after.allocated;
  return r;
}

}  // namespace qcow2dedup
