#include "stats/l2_walk.h"

#include <fmt/format.h>

namespace qcow2dedup {

Status DecodeL2Table(ImageState& s, uint64_t l1_index, uint64_t guest_clusters, std::vector<GuestCluster>& out) {
  out.clear();
  const auto& l1 = s.map->l1();
  if (l1_index >= l1.size() || L1Offset(l1[l1_index]) == 0) return Status::Ok();
  const Header& h = s.header;
  const uint64_t first = l1_index * h.l2_entries();
  if (first >= guest_clusters) return Status::Ok();
  const uint64_t n = std::min(h.l2_entries(), guest_clusters - first);
  std::vector<uint8_t> table(s.cs());
  QD_RETURN_IF_ERROR(s.file->ReadAt(L1Offset(l1[l1_index]), table));
  out.reserve(n);
  for (uint64_t j = 0; j < n; ++j) {
    QD_ASSIGN_OR_RETURN(L2Entry e, s.map->Decode(first + j, &table[j * h.l2_entry_bytes()]));
    out.push_back(GuestCluster{first + j, e.kind, e.host, e.raw});
  }
  return Status::Ok();
}

}  // namespace qcow2dedup
