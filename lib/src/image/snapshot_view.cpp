// Image::SelectSnapshot: the reader follows a snapshot's L1 table instead
// of the active one. Nothing is written, so the header in memory may say
// what the snapshot says (its L1 table, its size) without harm.
#include <fmt/format.h>

#include "image/cluster_map.h"
#include "image/image_state.h"

namespace qcow2dedup {

Status Image::SelectSnapshot(const std::optional<std::string>& id, const std::optional<std::string>& name) {
  ImageState& s = *state_;
  if (s.writer) return Status::InvalidArgument("a snapshot can only be read from an image opened read-only");
  for (const Snapshot& snap : s.snapshots.snapshots) {
    if ((id && snap.info.id != *id) || (name && snap.info.name != *name)) continue;
    Header& h = s.header;
    if (L1EntriesFor(snap.disk_size, h) > snap.l1_size)
      return Status::Corruption(fmt::format("snapshot '{}': its L1 table of {} entries does not cover its {} bytes",
                                            snap.info.name, snap.l1_size, snap.disk_size));
    h.l1_offset = snap.l1_offset;
    h.l1_size = snap.l1_size;
    h.virtual_size = snap.disk_size;
    auto map = std::make_unique<ClusterMap>(s.file.get(), &h, &s.meta, CacheTables(s.cs(), 0));
    QD_RETURN_IF_ERROR(map->Load(s.file_size));
    s.map = std::move(map);
    s.decompressed_entry = 0;
    s.decompressed.clear();
    return Status::Ok();
  }
  return Status::NotFound("Can't find snapshot");
}

}  // namespace qcow2dedup
