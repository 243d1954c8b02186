#include "stats/l2_walk.h"

#include <fmt/format.h>

namespace qcow2dedup {
namespace {

Result<GuestCluster> Decode(ImageState& s, uint64_t index, const uint8_t* p) {
  const Header& h = s.header;
  const uint64_t cs = s.cs(), guest = index * cs;
  const uint64_t e = LoadBe64(p);
  if (IsCompressed(e)) {
    CompressedDescriptor d = DecodeCompressed(e, h.cluster_bits);
    if (d.offset < cs || d.offset >= s.file_size)
      return Status::Corruption(
          fmt::format("compressed cluster for guest offset {:#x} at {:#x} lies outside the file", guest, d.offset));
    return GuestCluster{index, GuestKind::kCompressed, d.offset};
  }
  if (e & (kL2ReservedMask | (h.extended_l2() || h.version == 2 ? kFlagZero : 0)))
    return Status::Corruption(fmt::format("L2 entry for guest offset {:#x} has reserved bits set", guest));
  const uint64_t host = L2Offset(e);
  if (!h.extended_l2()) {
    if (e & kFlagZero) return GuestCluster{index, GuestKind::kZero, 0};
    if (host == 0) return GuestCluster{index, GuestKind::kUnallocated, 0};
    QD_RETURN_IF_ERROR(s.map->CheckDataOffset(guest, host));
    return GuestCluster{index, GuestKind::kData, host};
  }
  const uint64_t bitmap = LoadBe64(p + 8);
  const uint32_t alloc = uint32_t(bitmap), zero = uint32_t(bitmap >> 32);
  if (alloc & zero)
    return Status::Corruption(fmt::format("a subcluster for guest offset {:#x} is both allocated and zero", guest));
  if (alloc) {
    if (host == 0)
      return Status::Corruption(fmt::format("subclusters for guest offset {:#x} are allocated without an offset", guest));
    QD_RETURN_IF_ERROR(s.map->CheckDataOffset(guest, host));
    return GuestCluster{index, GuestKind::kData, host};
  }
  return GuestCluster{index, zero == 0xffffffffu ? GuestKind::kZero : GuestKind::kUnallocated, 0};
}

}  // namespace

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
    QD_ASSIGN_OR_RETURN(GuestCluster g, Decode(s, first + j, &table[j * h.l2_entry_bytes()]));
    out.push_back(g);
  }
  return Status::Ok();
}

}  // namespace qcow2dedup
