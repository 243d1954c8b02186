#include "check/stored_refcounts.h"

#include <fmt/format.h>

#include "format/endian.h"
#include "format/refcount_block.h"

namespace qcow2dedup::check {
namespace {
// Blocks kept in memory at once; beyond this the cache starts over.
constexpr uint64_t kCacheBytes = 64u << 20;
// QEMU's block layer fails any request past BDRV_MAX_LENGTH (INT64_MAX
// rounded down to 1 GiB) instead of reading zeros.
constexpr uint64_t kBdrvMaxLength = uint64_t(INT64_MAX) & ~((1ull << 30) - 1);
}  // namespace

Status StoredRefcounts::Load() {
  QD_RETURN_IF_ERROR(Flush());
  cache_.clear();
  const Header& h = ctx_.header;
  std::vector<uint8_t> raw(uint64_t(h.reftable_clusters) * ctx_.cs());
  QD_RETURN_IF_ERROR(ctx_.Read(h.reftable_offset, raw));
  table_.resize(raw.size() / 8);
  for (size_t i = 0; i < table_.size(); ++i) table_[i] = LoadBe64(&raw[i * 8]);
  return Status::Ok();
}

Result<uint64_t> StoredRefcounts::BlockOffset(uint64_t b) const {
  if (b >= table_.size()) return uint64_t(0);
  const uint64_t offset = table_[b] & kRefTableOffsetBits;
  if (offset % ctx_.cs())
    return Status::IOError(fmt::format("refcount block {} at {:#x} is not cluster aligned", b, offset));
  if (offset > kBdrvMaxLength - ctx_.cs())
    return Status::IOError(fmt::format("refcount block {} at {:#x} is beyond any file", b, offset));
  return offset;
}

Result<uint8_t*> StoredRefcounts::Block(uint64_t b) {
  QD_ASSIGN_OR_RETURN(uint64_t offset, BlockOffset(b));
  if (offset == 0) return static_cast<uint8_t*>(nullptr);
  auto it = cache_.find(b);
  if (it != cache_.end()) return it->second.bytes.data();
  if ((cache_.size() + 1) * ctx_.cs() > kCacheBytes) {
    QD_RETURN_IF_ERROR(Flush());
    cache_.clear();
  }
  Cached& c = cache_[b];
  c.bytes.resize(ctx_.cs());
  QD_RETURN_IF_ERROR(ctx_.Read(offset, c.bytes));
  return c.bytes.data();
}

Result<uint64_t> StoredRefcounts::Get(uint64_t cluster) {
  QD_ASSIGN_OR_RETURN(uint8_t * block, Block(cluster / per_block()));
  if (!block) return uint64_t(0);
  return GetRefcount(block, ctx_.header.refcount_order, cluster % per_block());
}

Status StoredRefcounts::Set(uint64_t cluster, uint64_t value) {
  const uint64_t b = cluster / per_block();
  QD_ASSIGN_OR_RETURN(uint8_t * block, Block(b));
  if (!block) return Status::Corruption(fmt::format("cluster {} has no refcount block", cluster));
  if (value > ctx_.header.max_refcount())
    return Status::Corruption(fmt::format("refcount {} of cluster {} does not fit", value, cluster));
  SetRefcount(block, ctx_.header.refcount_order, cluster % per_block(), value);
  cache_[b].dirty = true;
  return Status::Ok();
}

Status StoredRefcounts::Flush() {
  for (auto& [b, c] : cache_) {
    if (!c.dirty) continue;
    QD_ASSIGN_OR_RETURN(uint64_t offset, BlockOffset(b));
    QD_RETURN_IF_ERROR(ctx_.Write(offset, c.bytes));
    c.dirty = false;
  }
  return Status::Ok();
}

Result<uint64_t> StoredRefcounts::EndCluster() {
  for (uint64_t b = table_.size(); b-- > 0;) {
    auto offset = BlockOffset(b);
    if (!offset.ok() || *offset == 0 || *offset >= ctx_.file_size) continue;
    QD_ASSIGN_OR_RETURN(uint8_t * block, Block(b));
    for (uint64_t i = per_block(); i-- > 0;)
      if (GetRefcount(block, ctx_.header.refcount_order, i)) return b * per_block() + i + 1;
  }
  return uint64_t(0);
}

}  // namespace qcow2dedup::check
