// A whole new refcount structure, for when the old one cannot be trusted
// to take fixes (blocks missing, misplaced or shared). Unlike QEMU, which
// fills holes, the new blocks and table go past the last cluster in use:
// nothing the old structure still describes is overwritten before the
// header switches over, so a crash leaves the old structure in place.
#include <fmt/format.h>

#include <algorithm>

#include "check/passes.h"
#include "format/endian.h"
#include "format/refcount_block.h"

namespace qcow2dedup::check {
namespace {

struct Layout {
  std::vector<uint64_t> blocks;  // block indices that get a block, ascending
  uint64_t table_clusters = 0;
};

// Blocks for every range with a reference, plus for the new structure
// itself, which in turn may need a bigger table: repeat until it settles.
Layout Plan(const std::vector<uint64_t>& used, uint64_t first_free, uint64_t per, uint64_t cs) {
  Layout l;
  for (;;) {
    const uint64_t n_new = l.blocks.size() + l.table_clusters;
    std::vector<uint64_t> blocks = used;
    if (n_new) {
      for (uint64_t b = first_free / per; b <= (first_free + n_new - 1) / per; ++b) blocks.push_back(b);
    }
    std::sort(blocks.begin(), blocks.end());
    blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
    const uint64_t entries = blocks.empty() ? 1 : blocks.back() + 1;
    const uint64_t table_clusters = (entries * 8 + cs - 1) / cs;
    if (blocks == l.blocks && table_clusters == l.table_clusters) return l;
    l.blocks = std::move(blocks);
    l.table_clusters = table_clusters;
  }
}

}  // namespace

Status RebuildRefcounts(Context& ctx, References& refs, uint64_t first_free, CheckReport& r) {
  Note(r, FindingArea::kRefcounts, FindingKind::kNote, "Rebuilding refcount structure");
  const uint64_t cs = ctx.cs();
  const uint64_t per = ctx.header.refblock_entries();
  const uint32_t order = ctx.header.refcount_order;
  ReferenceCounts& counts = refs.counts;
  first_free = std::max<uint64_t>(first_free, 1);

  std::vector<uint64_t> used;
  for (uint64_t b = 0; b * per < counts.size(); ++b) {
    for (uint64_t i = b * per; i < std::min(counts.size(), (b + 1) * per); ++i) {
      if (counts.Get(i)) {
        used.push_back(b);
        break;
      }
    }
  }
  const Layout l = Plan(used, first_free, per, cs);
  if (l.table_clusters * cs > kMaxRefTableBytes)
    return Status::NoSpace("the rebuilt refcount table would exceed its maximum size");

  const uint64_t table_at = first_free + l.blocks.size();
  for (uint64_t c = first_free; c < table_at + l.table_clusters; ++c) counts.Set(c, 1);
  std::vector<uint8_t> table(l.table_clusters * cs, 0), block(cs);
  for (size_t k = 0; k < l.blocks.size(); ++k) {
    const uint64_t b = l.blocks[k];
    std::fill(block.begin(), block.end(), 0);
    for (uint64_t i = 0; i < per; ++i)
      if (uint64_t v = counts.Get(b * per + i)) SetRefcount(block.data(), order, i, v);
    const uint64_t at = (first_free + k) * cs;
    QD_RETURN_IF_ERROR(ctx.Write(at, block));
    StoreBe64(&table[b * 8], at);
  }
  QD_RETURN_IF_ERROR(ctx.Write(table_at * cs, table));
  QD_RETURN_IF_ERROR(ctx.file->Sync());
  // The switch: one header write, after everything it points at is durable.
  uint8_t field[12];
  StoreBe64(field, table_at * cs);
  for (int i = 0; i < 4; ++i) field[8 + i] = uint8_t(l.table_clusters >> (24 - 8 * i));
  QD_RETURN_IF_ERROR(ctx.Write(kHeaderRefTableAt, field));
  QD_RETURN_IF_ERROR(ctx.file->Sync());
  ctx.header.reftable_offset = table_at * cs;
  ctx.header.reftable_clusters = uint32_t(l.table_clusters);
  return Status::Ok();
}

}  // namespace qcow2dedup::check
