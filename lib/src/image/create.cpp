// create: an empty v3 image with our (empty, in sync) dedup index.
#include <fmt/format.h>

#include <bit>

#include "format/refcount_block.h"
#include "image/image_state.h"
#include "io/unsynced_file.h"

namespace qcow2dedup {
namespace {

Status Validate(const CreateOptions& o) {
  if (!std::has_single_bit(o.cluster_size) || o.cluster_size < 512 || o.cluster_size > (2u << 20))
    return Status::InvalidArgument(
        fmt::format("cluster size {} must be a power of two between 512 and 2M", o.cluster_size));
  if (!std::has_single_bit(o.refcount_bits) || o.refcount_bits > 64)
    return Status::InvalidArgument(
        fmt::format("refcount width {} must be a power of two between 1 and 64", o.refcount_bits));
  if (o.backing_file.empty() != o.backing_format.empty())
    return Status::InvalidArgument("a backing file needs its format, and a format its file");
  if (!o.backing_format.empty() && o.backing_format != "raw" && o.backing_format != "qcow2")
    return Status::Unsupported(fmt::format("backing file format '{}' is not supported (raw or qcow2)", o.backing_format));
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<Image>> Image::Create(const std::string& path, const CreateOptions& o, OpenOptions open) {
  QD_RETURN_IF_ERROR(Validate(o));
  Header h;
  h.cluster_bits = uint32_t(std::countr_zero(o.cluster_size));
  h.refcount_order = uint32_t(std::countr_zero(o.refcount_bits));
  h.virtual_size = (o.virtual_size + 511) & ~511ull;
  if (o.virtual_size > kMaxVirtualSize) return Status::InvalidArgument("image size is too large");
  if (o.lazy_refcounts) h.compatible |= kCompatLazyRefcounts;
  if (o.compression_type == Compression::kZstd) {
    // As qemu-img create -o compression_type=zstd: the type in header byte
    // 104, and the incompatible bit that keeps zstd-less readers out.
    h.compression = CompressionType::kZstd;
    h.incompatible |= kIncompatCompression;
  }
  if (!o.backing_file.empty()) {
    h.backing_file = o.backing_file;
    h.backing_format = o.backing_format;
  }
  h.dedup = DedupExtension{};
  h.autoclear |= kAutoclearDedupInSync;
  h.feature_names[{2, 48}] = "dedup index in sync";
  const uint64_t cs = h.cluster_size();
  const uint64_t l1_entries = std::max<uint64_t>(1, L1EntriesFor(h.virtual_size, h));
  if (l1_entries * 8 > kMaxL1Bytes)
    return Status::InvalidArgument(
        fmt::format("image size {} needs an L1 table larger than 32 MiB at cluster size {}", h.virtual_size, cs));
  h.l1_size = uint32_t(l1_entries);

  // Layout: header, refcount table, refcount blocks for the metadata, L1.
  const uint64_t per_block = h.refblock_entries();
  const uint64_t l1_clusters = (l1_entries * 8 + cs - 1) / cs;
  // The refcount table covers the whole disk's worth of clusters and more, so
  // it seldom has to move.
  const uint64_t est = (h.virtual_size / cs) * 11 / 10 + l1_clusters + 64;
  uint64_t rt_clusters = std::max<uint64_t>(1, ((est + per_block - 1) / per_block * 8 + cs - 1) / cs);
  rt_clusters = std::min<uint64_t>(rt_clusters, kMaxRefTableBytes / cs);
  uint64_t rb = 1;
  while ((1 + rt_clusters + rb + l1_clusters) > rb * per_block) ++rb;
  const uint64_t meta_clusters = 1 + rt_clusters + rb + l1_clusters;
  h.reftable_offset = cs;
  h.reftable_clusters = uint32_t(rt_clusters);
  h.l1_offset = (1 + rt_clusters + rb) * cs;

  std::unique_ptr<File> file = std::move(open.file);
  if (file) {
    QD_RETURN_IF_ERROR(file->Lock(LockMode::kExclusive));
    QD_RETURN_IF_ERROR(file->Truncate(0));
  } else if (o.force) {
    QD_ASSIGN_OR_RETURN(file, OpenPosixFile(path, OpenMode::kCreateOrOpen));
    QD_RETURN_IF_ERROR(file->Lock(LockMode::kExclusive));
    QD_RETURN_IF_ERROR(file->Truncate(0));
  } else {
    auto f = OpenPosixFile(path, OpenMode::kCreate);
    if (!f.ok() && f.status().kind() == ErrorKind::kExists)
      return Status::Exists("file exists (use --force to replace it)");
    if (!f.ok()) return f.status();
    file = std::move(f).value();
    QD_RETURN_IF_ERROR(file->Lock(LockMode::kExclusive));
  }
  file = WithCacheMode(std::move(file), open.cache);

  QD_ASSIGN_OR_RETURN(std::vector<uint8_t> head, EncodeHeader(h));
  head.resize(cs, 0);
  std::vector<uint8_t> rt(rt_clusters * cs, 0);
  std::vector<uint8_t> blocks(rb * cs, 0);
  for (uint64_t b = 0; b < rb; ++b) StoreBe64(&rt[b * 8], (1 + rt_clusters + b) * cs);
  for (uint64_t c = 0; c < meta_clusters; ++c) SetRefcount(blocks.data() + (c / per_block) * cs, h.refcount_order, c % per_block, 1);
  // The header goes last: until it is on disk the file is no image at all.
  QD_RETURN_IF_ERROR(file->Truncate(meta_clusters * cs));
  QD_RETURN_IF_ERROR(file->WriteAt(cs, rt));
  QD_RETURN_IF_ERROR(file->WriteAt((1 + rt_clusters) * cs, blocks));
  QD_RETURN_IF_ERROR(file->Sync());
  QD_RETURN_IF_ERROR(file->WriteAt(0, head));
  QD_RETURN_IF_ERROR(file->Sync());
  open.writable = true;
  open.file = std::move(file);
  return Image::Open(path, std::move(open));
}

}  // namespace qcow2dedup
