#include "image/cluster_map.h"

#include <fmt/format.h>

namespace qcow2dedup {

ClusterMap::ClusterMap(File* file, Header* header, MetadataMap* meta, uint64_t cache_tables)
    : file_(file),
      h_(header),
      meta_(meta),
      l2_(file, header->cluster_size(), cache_tables,
          [meta](uint64_t off) { return meta->CheckTableWrite(off); }) {}

Status ClusterMap::CheckL2Offset(uint64_t index, uint64_t off) const {
  const uint64_t cs = h_->cluster_size();
  if (off % cs != 0)
    return Status::Corruption(fmt::format("L2 table {} at {:#x} is not cluster aligned", index, off));
  if (off + cs > file_size_)
    return Status::Corruption(fmt::format("L2 table {} at {:#x} lies beyond the end of the file", index, off));
  if (const char* what = meta_->FixedStructureAt(off))
    return Status::Corruption(fmt::format("L2 table {} at {:#x} overlaps {}", index, off, what));
  return Status::Ok();
}

Status ClusterMap::CheckDataOffset(uint64_t guest_offset, uint64_t host) const {
  const uint64_t cs = h_->cluster_size();
  if (host % cs != 0)
    return Status::Corruption(
        fmt::format("data cluster for guest offset {:#x} at {:#x} is not cluster aligned", guest_offset, host));
  if (host >= file_size_)
    return Status::Corruption(
        fmt::format("data cluster for guest offset {:#x} at {:#x} lies beyond the end of the file", guest_offset, host));
  if (const char* what = meta_->FixedStructureAt(host))
    return Status::Corruption(
        fmt::format("data cluster for guest offset {:#x} at {:#x} overlaps {}", guest_offset, host, what));
  return Status::Ok();
}

Status ClusterMap::Load(uint64_t file_size) {
  file_size_ = file_size;
  std::vector<uint8_t> raw(uint64_t(h_->l1_size) * 8);
  QD_RETURN_IF_ERROR(file_->ReadAt(h_->l1_offset, raw));
  l1_.resize(h_->l1_size);
  for (size_t i = 0; i < l1_.size(); ++i) {
    uint64_t e = LoadBe64(&raw[i * 8]);
    if (e & kL1ReservedMask & ~kFlagCopied)
      return Status::Corruption(fmt::format("L1 entry {} has reserved bits set", i));
    if (L1Offset(e) != 0) {
      QD_RETURN_IF_ERROR(CheckL2Offset(i, L1Offset(e)));
      meta_->AddTable(L1Offset(e));
    }
    l1_[i] = e;
  }
  return Status::Ok();
}

Result<L2Entry> ClusterMap::Decode(uint64_t guest_cluster, const uint8_t* p) const {
  const uint64_t cs = h_->cluster_size(), guest = guest_cluster * cs;
  const uint64_t e = LoadBe64(p);
  if (IsCompressed(e)) {
    CompressedDescriptor d = DecodeCompressed(e, h_->cluster_bits);
    if (d.offset < cs || d.offset >= file_size_)
      return Status::Corruption(fmt::format("compressed cluster for guest offset {:#x} at {:#x} lies outside the file",
                                            guest, d.offset));
    return L2Entry{ClusterKind::kCompressed, d.offset, e, 0};
  }
  if (e & (kL2ReservedMask | (h_->extended_l2() || h_->version == 2 ? kFlagZero : 0)))
    return Status::Corruption(fmt::format("L2 entry for guest offset {:#x} has reserved bits set", guest));
  const uint64_t host = L2Offset(e);
  if (!h_->extended_l2()) {
    if (e & kFlagZero) return L2Entry{ClusterKind::kZero, 0, e, 0};
    if (host == 0) return L2Entry{ClusterKind::kUnallocated, 0, e, 0};
    QD_RETURN_IF_ERROR(CheckDataOffset(guest, host));
    return L2Entry{ClusterKind::kData, host, e, 0};
  }
  const uint64_t bitmap = LoadBe64(p + 8);
  const uint32_t alloc = uint32_t(bitmap), zero = uint32_t(bitmap >> 32);
  if (alloc & zero)
    return Status::Corruption(fmt::format("a subcluster for guest offset {:#x} is both allocated and zero", guest));
  if (alloc) {
    if (host == 0)
      return Status::Corruption(fmt::format("subclusters for guest offset {:#x} are allocated without an offset", guest));
    QD_RETURN_IF_ERROR(CheckDataOffset(guest, host));
    return L2Entry{ClusterKind::kData, host, e, bitmap};
  }
  return L2Entry{zero == 0xffffffffu ? ClusterKind::kZero : ClusterKind::kUnallocated, 0, e, bitmap};
}

Result<Plan> ClusterMap::Lookup(uint64_t guest) {
  const uint64_t cs = h_->cluster_size();
  const uint64_t in_cluster = guest & (cs - 1);
  const uint64_t l1_index = guest / h_->l2_span();
  const uint64_t l2_index = (guest / cs) % h_->l2_entries();
  Plan plan{ClusterKind::kUnallocated, 0, 0, cs - in_cluster};
  if (l1_index >= l1_.size() || L1Offset(l1_[l1_index]) == 0) return plan;
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, l2_.Get(L1Offset(l1_[l1_index])));
  QD_ASSIGN_OR_RETURN(L2Entry e, Decode(guest / cs, t->data() + l2_index * h_->l2_entry_bytes()));
  plan.entry = e.raw;
  if (!h_->extended_l2() || e.kind == ClusterKind::kCompressed) {
    plan.kind = e.kind;
    if (e.kind == ClusterKind::kData) plan.host_offset = e.host + in_cluster;
    return plan;
  }
  // Extended L2: one subcluster at a time.
  const uint64_t sub_size = cs / 32;
  const uint32_t sub = uint32_t(in_cluster / sub_size);
  plan.length = sub_size - (in_cluster % sub_size);
  if (e.bitmap & (1ull << sub)) {
    plan.kind = ClusterKind::kData;
    plan.host_offset = e.host + in_cluster;
  } else if (e.bitmap & (1ull << (32 + sub))) {
    plan.kind = ClusterKind::kZero;
  }
  return plan;
}

Result<uint64_t> ClusterMap::GetEntry(uint64_t guest_cluster) {
  const uint64_t l1_index = guest_cluster / h_->l2_entries();
  if (l1_index >= l1_.size() || L1Offset(l1_[l1_index]) == 0) return uint64_t(0);
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, l2_.Get(L1Offset(l1_[l1_index])));
  return LoadBe64(t->data() + (guest_cluster % h_->l2_entries()) * h_->l2_entry_bytes());
}

Result<uint64_t> ClusterMap::GetBitmap(uint64_t guest_cluster) {
  const uint64_t l1_index = guest_cluster / h_->l2_entries();
  if (!h_->extended_l2() || l1_index >= l1_.size() || L1Offset(l1_[l1_index]) == 0) return uint64_t(0);
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, l2_.Get(L1Offset(l1_[l1_index])));
  return LoadBe64(t->data() + (guest_cluster % h_->l2_entries()) * h_->l2_entry_bytes() + 8);
}

Status ClusterMap::AddTable(uint64_t l1_index, uint64_t table) {
  QD_RETURN_IF_ERROR(meta_->CheckTableWrite(table));
  meta_->AddTable(table);
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, l2_.Create(table));
  (void)t;
  l2_.MarkDirty(table);
  l1_[l1_index] = table | kFlagCopied;
  l1_dirty_ = true;
  file_size_ = std::max(file_size_, table + h_->cluster_size());
  return Status::Ok();
}

Status ClusterMap::SetL1Copied(uint64_t l1_index) {
  l1_[l1_index] |= kFlagCopied;
  l1_dirty_ = true;
  return Status::Ok();
}

Status ClusterMap::SetEntry(uint64_t guest_cluster, uint64_t entry, uint64_t bitmap) {
  const uint64_t l1_index = guest_cluster / h_->l2_entries();
  if (l1_index >= l1_.size() || L1Offset(l1_[l1_index]) == 0 || !(l1_[l1_index] & kFlagCopied))
    return Status::InvalidArgument(fmt::format("guest cluster {} has no L2 table of its own", guest_cluster));
  const uint64_t table = L1Offset(l1_[l1_index]);
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, l2_.Get(table));
  uint8_t* p = t->data() + (guest_cluster % h_->l2_entries()) * h_->l2_entry_bytes();
  StoreBe64(p, entry);
  if (h_->extended_l2()) StoreBe64(p + 8, bitmap);
  l2_.MarkDirty(table);
  return Status::Ok();
}

Status ClusterMap::WriteL1() {
  if (!l1_dirty_) return Status::Ok();
  std::vector<uint8_t> raw(l1_.size() * 8);
  for (size_t i = 0; i < l1_.size(); ++i) StoreBe64(&raw[i * 8], l1_[i]);
  QD_RETURN_IF_ERROR(file_->WriteAt(h_->l1_offset, raw));
  l1_dirty_ = false;
  return Status::Ok();
}

}  // namespace qcow2dedup
