// The snapshot table as check reads it: like QEMU, which opens an image
// whose snapshots point at nonsense and lets the check report it, rather
// than like the reader (format/snapshot.cpp), which refuses such an image.
// Entries past the end of the file read as zeros.
#include <fmt/format.h>

#include "check/context.h"
#include "format/endian.h"

namespace qcow2dedup::check {
namespace {

constexpr uint32_t kMaxExtraData = 1024;                 // QCOW_MAX_SNAPSHOT_EXTRA_DATA
constexpr uint64_t kMaxSnapshotsSize = 1024ull * 65536;  // QCOW_MAX_SNAPSHOTS_SIZE
constexpr uint32_t kEntryHeaderBytes = 40;

uint32_t Be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
uint16_t Be16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }

}  // namespace

Status ReadSnapshots(Context& ctx) {
  const Header& h = ctx.header;
  ctx.snapshots = SnapshotTable{};
  ctx.snapshot_incomplete.clear();
  uint64_t pos = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots; ++i) {
    pos = (pos + 7) & ~7ull;
    uint8_t raw[kEntryHeaderBytes];
    QD_RETURN_IF_ERROR(ctx.Read(pos, raw));
    const uint32_t extra = Be32(raw + 36);
    const uint16_t id_len = Be16(raw + 12), name_len = Be16(raw + 14);
    if (extra > kMaxExtraData)
      return Status::Corruption(fmt::format("Too much extra metadata in snapshot table entry {}", i));
    std::vector<uint8_t> rest(uint64_t(extra) + id_len + name_len);
    QD_RETURN_IF_ERROR(ctx.Read(pos + kEntryHeaderBytes, rest));
    pos += kEntryHeaderBytes + rest.size();
    if (pos - h.snapshots_offset > kMaxSnapshotsSize) return Status::Corruption("Snapshot table is too big");

    Snapshot s;
    s.l1_offset = LoadBe64(raw);
    s.l1_size = Be32(raw + 8);
    s.info.date_sec = Be32(raw + 16);
    s.info.date_nsec = Be32(raw + 20);
    s.info.vm_clock_nsec = LoadBe64(raw + 24);
    s.info.vm_state_size = Be32(raw + 32);
    if (extra >= 8) s.info.vm_state_size = LoadBe64(rest.data());
    s.disk_size = extra >= 16 ? LoadBe64(rest.data() + 8) : h.virtual_size;
    if (extra >= 24) s.info.icount = LoadBe64(rest.data() + 16);
    const char* text = reinterpret_cast<const char*>(rest.data());
    s.info.id.assign(text + extra, text + extra + id_len);
    s.info.name.assign(text + extra + id_len, text + rest.size());
    ctx.snapshots.snapshots.push_back(std::move(s));
    // Version 3 requires the VM state size and disk size in the extra data.
    ctx.snapshot_incomplete.push_back(h.version >= 3 && extra < 16);
  }
  ctx.snapshots.bytes = pos - h.snapshots_offset;
  return Status::Ok();
}

}  // namespace qcow2dedup::check
