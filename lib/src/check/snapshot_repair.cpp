// Snapshot table entries without the extra data that version 3 requires
// (VM state size and disk size): QEMU's check -r all writes the table anew
// with the entries completed, and so do we, in fresh clusters, switching
// the header over only when the new table is on disk.
#include <fmt/format.h>

#include <algorithm>

#include "check/passes.h"
#include "format/endian.h"

namespace qcow2dedup::check {
namespace {

constexpr uint32_t kExtraBytes = 24;  // vm_state_size_large, disk_size, icount

void Put32(uint8_t* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = uint8_t(v);
}
void Put16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}

std::vector<uint8_t> EncodeTable(const std::vector<Snapshot>& snapshots) {
  std::vector<uint8_t> out;
  for (const Snapshot& s : snapshots) {
    out.resize((out.size() + 7) & ~size_t(7), 0);
    const size_t at = out.size();
    const uint16_t id_len = uint16_t(std::min<size_t>(s.info.id.size(), UINT16_MAX));
    const uint16_t name_len = uint16_t(std::min<size_t>(s.info.name.size(), UINT16_MAX));
    out.resize(at + 40 + kExtraBytes + id_len + name_len, 0);
    uint8_t* p = &out[at];
    StoreBe64(p, s.l1_offset);
    Put32(p + 8, s.l1_size);
    Put16(p + 12, id_len);
    Put16(p + 14, name_len);
    Put32(p + 16, uint32_t(s.info.date_sec));
    Put32(p + 20, s.info.date_nsec);
    StoreBe64(p + 24, s.info.vm_clock_nsec);
    // Too large for the old field: older readers then see a disk-only snapshot.
    Put32(p + 32, s.info.vm_state_size <= UINT32_MAX ? uint32_t(s.info.vm_state_size) : 0);
    Put32(p + 36, kExtraBytes);
    StoreBe64(p + 40, s.info.vm_state_size);
    StoreBe64(p + 48, s.disk_size);
    StoreBe64(p + 56, s.info.icount);
    std::copy_n(s.info.id.data(), id_len, p + 40 + kExtraBytes);
    std::copy_n(s.info.name.data(), name_len, p + 40 + kExtraBytes + id_len);
  }
  return out;
}

}  // namespace

Result<uint64_t> RewriteSnapshotTable(Context& ctx, StoredRefcounts& stored, FreshClusters& fresh, CheckReport& r) {
  const uint64_t incomplete = std::count(ctx.snapshot_incomplete.begin(), ctx.snapshot_incomplete.end(), true);
  if (!incomplete) return uint64_t(0);
  const uint64_t cs = ctx.cs();
  for (size_t i = 0; i < ctx.snapshot_incomplete.size(); ++i)
    if (ctx.snapshot_incomplete[i]) Note(r, FindingArea::kSnapshots, FindingKind::kRepaired, fmt::format("Repairing snapshot table entry {} is incomplete", i));

  const std::vector<uint8_t> table = EncodeTable(ctx.snapshots.snapshots);
  QD_ASSIGN_OR_RETURN(uint64_t c, fresh.Take((table.size() + cs - 1) / cs));
  QD_RETURN_IF_ERROR(ctx.Write(c * cs, table));
  QD_RETURN_IF_ERROR(stored.Flush());
  QD_RETURN_IF_ERROR(ctx.file->Sync());
  uint8_t field[12];
  Put32(field, ctx.header.nb_snapshots);
  StoreBe64(field + 4, c * cs);
  QD_RETURN_IF_ERROR(ctx.Write(60, field));  // nb_snapshots and snapshots_offset, in one write
  QD_RETURN_IF_ERROR(ctx.file->Sync());

  // The old table's clusters are free now, as QEMU frees them.
  const uint64_t old_offset = ctx.header.snapshots_offset, old_bytes = ctx.snapshots.bytes;
  if (old_bytes && old_offset < ctx.file_size) {
    for (uint64_t k = old_offset / cs; k <= (old_offset + old_bytes - 1) / cs && k < ctx.FileClusters(); ++k) {
      auto rc = stored.Get(k);
      if (rc.ok() && *rc > 0) QD_RETURN_IF_ERROR(stored.Set(k, *rc - 1));
    }
    QD_RETURN_IF_ERROR(stored.Flush());
  }
  ctx.header.snapshots_offset = c * cs;
  QD_RETURN_IF_ERROR(ReadSnapshots(ctx));
  r.corruptions_fixed += incomplete;
  return incomplete;
}

}  // namespace qcow2dedup::check
