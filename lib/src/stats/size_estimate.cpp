#include "stats/size_estimate.h"

#include <algorithm>

#include "dedup/index_table.h"
#include "format/header.h"

namespace qcow2dedup {

uint64_t EstimateImageSize(uint64_t device_size, uint64_t cs, uint64_t l2_tables, uint64_t unique) {
  auto div_up = [](uint64_t a, uint64_t b) { return (a + b - 1) / b; };
  const uint64_t virtual_size = div_up(device_size, 512) * 512;  // as Image::Create rounds it
  const uint64_t per_block = cs * 8 / 16;
  const uint64_t l1_entries = std::max<uint64_t>(1, div_up(virtual_size, cs * (cs / 8)));
  const uint64_t l1 = div_up(l1_entries * 8, cs);
  // Image::Create's refcount table: room for the whole disk and a tenth more.
  const uint64_t planned = virtual_size / cs * 11 / 10 + l1 + 64;
  const uint64_t reftable =
      std::min(std::max<uint64_t>(1, div_up(div_up(planned, per_block) * 8, cs)), kMaxRefTableBytes / cs);
  const uint64_t others = 1 + reftable + l1 + l2_tables + unique;
  // Each block sits in the range it covers, so it counts itself.
  const uint64_t blocks = std::max<uint64_t>(1, div_up(others, per_block - 1));
  const uint64_t end = others + blocks;
  if (unique == 0) return end * cs;
  // The index table follows, with refcount 0 but covered by refcount
  // blocks: those it lacks go after it (the writer's AllocateRange).
  const uint64_t table_bytes = IndexTableBytes(IndexBucketsFor(unique));
  const uint64_t table = div_up(table_bytes, cs);
  uint64_t after = 0;
  while ((blocks + after) * per_block < end + table + after) ++after;
  return after ? (end + table + after) * cs : end * cs + table_bytes;
}

}  // namespace qcow2dedup
