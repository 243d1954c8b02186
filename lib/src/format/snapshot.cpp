#include "format/snapshot.h"

#include <fmt/format.h>

#include "format/endian.h"

namespace qcow2dedup {
namespace {

#pragma pack(push, 1)
struct RawSnapshotHeader {
  be64 l1_table_offset;
  be32 l1_size;
  be16 id_str_size;
  be16 name_size;
  be32 date_sec;
  be32 date_nsec;
  be64 vm_clock_nsec;
  be32 vm_state_size;
  be32 extra_data_size;
};
#pragma pack(pop)
static_assert(sizeof(RawSnapshotHeader) == 40);
constexpr uint32_t kMaxExtraData = 1024;  // QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA

}  // namespace

Result<SnapshotTable> ReadSnapshotTable(File& file, const Header& h, uint64_t file_size) {
  SnapshotTable table;
  uint64_t pos = h.snapshots_offset;
  const uint64_t cs = h.cluster_size();
  for (uint32_t i = 0; i < h.nb_snapshots; ++i) {
    RawSnapshotHeader raw;
    if (pos + sizeof raw > file_size)
      return Status::Corruption(fmt::format("snapshot {} lies beyond the end of the file", i));
    QD_RETURN_IF_ERROR(file.ReadAt(pos, {reinterpret_cast<uint8_t*>(&raw), sizeof raw}));
    uint32_t extra = raw.extra_data_size;
    uint32_t id_len = raw.id_str_size, name_len = raw.name_size;
    if (extra > kMaxExtraData) return Status::Corruption(fmt::format("snapshot {} has too much extra data", i));
    uint64_t len = sizeof raw + extra + id_len + name_len;
    if (pos + len > file_size) return Status::Corruption(fmt::format("snapshot {} lies beyond the end of the file", i));
    std::vector<uint8_t> rest(len - sizeof raw);
    QD_RETURN_IF_ERROR(file.ReadAt(pos + sizeof raw, rest));
    Snapshot s;
    s.l1_offset = raw.l1_table_offset;
    s.l1_size = raw.l1_size;
    s.info.date_sec = raw.date_sec;
    s.info.date_nsec = raw.date_nsec;
    s.info.vm_clock_nsec = raw.vm_clock_nsec;
    s.info.vm_state_size = raw.vm_state_size;
    if (extra >= 8) s.info.vm_state_size = LoadBe64(&rest[0]);
    s.disk_size = extra >= 16 ? LoadBe64(&rest[8]) : h.virtual_size;
    if (extra >= 24) s.info.icount = LoadBe64(&rest[16]);
    s.info.id.assign(reinterpret_cast<const char*>(rest.data()) + extra, id_len);
    s.info.name.assign(reinterpret_cast<const char*>(rest.data()) + extra + id_len, name_len);
    if (uint64_t(s.l1_size) * 8 > kMaxL1Bytes)
      return Status::Corruption(fmt::format("snapshot '{}' has an L1 table of {} entries", s.info.name, s.l1_size));
    // An empty L1 table (a snapshot of an empty disk) occupies nothing: like
    // QEMU, only its alignment matters (offset 0 included).
    if (s.l1_offset % cs != 0 ||
        (s.l1_size != 0 && (s.l1_offset < cs || s.l1_offset + uint64_t(s.l1_size) * 8 > file_size)))
      return Status::Corruption(fmt::format("snapshot '{}' has its L1 table at a bad offset {:#x}", s.info.name,
                                            s.l1_offset));
    table.snapshots.push_back(std::move(s));
    pos += (len + 7) & ~7ull;
  }
  table.bytes = pos - h.snapshots_offset;
  return table;
}

}  // namespace qcow2dedup
