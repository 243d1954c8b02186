// The dedup write path: one cluster at a time, hashed in advance.
#include "image/writer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "dedup/index_table.h"
#include "format/bitmap_directory.h"
#include "image/bitmap_marks.h"
#include "image/image_state.h"
#include "io/vetted_stamps.h"
#include "qcow2dedup/check.h"

namespace qcow2dedup {

Writer::Writer(ImageState& s, uint64_t cache_tables)
    : s_(s),
      refcounts_(std::make_unique<Refcounts>(s.file.get(), &s.header, &s.meta, cache_tables)),
      data_(s.file.get()),
      packer_(s.cs()),
      digests_(DirectoryOf(s.path)),
      v2_(s.header.version == 2) {
  refcounts_->set_hold_decrements(v2_);
  index_.set_memory_cap(s.index_memory);
  if (s.header.dedup) prior_misses_ = s.header.dedup->memory_misses;
}

Writer::~Writer() = default;

Result<std::unique_ptr<Writer>> Writer::Start(ImageState& s, uint64_t cache_tables, const ProgressFn& progress) {
  std::unique_ptr<Writer> w(new Writer(s, cache_tables));
  QD_RETURN_IF_ERROR(w->Prepare(progress));
  return w;
}

Status Writer::Guarded(const std::function<Status()>& op) {
  if (!failed_.ok()) return failed_.Prefixed("an earlier write failed");
  Status st = op();
  if (!st.ok()) {
    failed_ = st;
    if (st.kind() == ErrorKind::kNoSpace) GiveBackSpace();
  }
  return st;
}

// The file system is full, and the clusters this session took since its
// last flush are leaked on disk. Repair now, as the next open would: the
// repair frees them and cuts the file at the image's end, so the space goes
// back at once instead of keeping the file system full.
void Writer::GiveBackSpace() {
  auto repaired = CheckFile(*s_.file, s_.path, RepairMode::kAll, nullptr);
  (void)repaired;  // if it fails too, the next open repairs
}

// Marks the image dirty and the index out of sync on disk before the first
// change, so a crash from here on is repaired and the index rebuilt.
Status Writer::BeginChange() {
  if (marked_dirty_) return Status::Ok();
  if (v2_) {
    // Nothing to mark: version 2 has neither the dirty bit nor autoclear
    // bits, and its index is never stored (see Close).
    marked_dirty_ = true;
    return Status::Ok();
  }
  // Persistent bitmaps are flagged in-use in the same sync (bitmap_marks.h).
  if (!bitmaps_) {
    QD_ASSIGN_OR_RETURN(bitmaps_, BitmapMarks::Load(s_));
  }
  QD_RETURN_IF_ERROR(bitmaps_->MarkInUse());
  s_.header.incompatible |= kIncompatDirty;
  s_.header.autoclear &= ~kAutoclearDedupInSync;
  QD_RETURN_IF_ERROR(WriteHeader(s_));
  QD_RETURN_IF_ERROR(s_.file->Sync());
  marked_dirty_ = true;
  return Status::Ok();
}

Status Writer::FlushDataOverlapping(uint64_t offset, uint64_t len) {
  return data_.Overlaps(offset, len) ? data_.Flush() : Status::Ok();
}

// Reads host cluster c into scratch_.
Status Writer::ReadCluster(uint64_t c) {
  const uint64_t cs = s_.cs();
  QD_RETURN_IF_ERROR(FlushDataOverlapping(c * cs, cs));
  scratch_.resize(cs);
  return s_.file->ReadAt(c * cs, scratch_);
}

// Drops one reference to host cluster c; at zero its hash leaves the index.
Status Writer::Release(uint64_t cluster, bool data, const Digest* known) {
  QD_ASSIGN_OR_RETURN(uint64_t left, refcounts_->Adjust(cluster, -1));
  if (left == 1) copied_fixups_.Insert(cluster);
  if (left != 0) return Status::Ok();
  ++stats_.freed_clusters;
  digests_.Forget(cluster);  // it may hold other data when it is handed out again
  packer_.Forget(cluster);  // once freed it may become anything
  if (!data) return Status::Ok();
  Digest digest;
  if (known) {
    digest = *known;
  } else {
    // Its bytes are still on disk (freed clusters wait for the next flush).
    QD_RETURN_IF_ERROR(ReadCluster(cluster));
    digest = Sha256(scratch_);
  }
  QD_ASSIGN_OR_RETURN(bool removed, index_.Remove(digest, cluster));
  if (!removed) {
    // Not where its data says: the index did not match the image. Unless
    // the cap left clusters out: then it is one of those, and the slow
    // scan is spared (what memory holds was hashed from unchanging data).
    if (!index_.refused()) index_.memory().RemoveCluster(cluster);
    if (index_.table()) index_.NoteInexact();
  }
  index_changed_ = true;
  return Status::Ok();
}

// Releases what an L2 entry referenced (bitmap: its subclusters', with
// extended L2).
Status Writer::ReleaseEntry(uint64_t entry, uint64_t bitmap) {
  const uint32_t bits = s_.header.cluster_bits;
  if (IsCompressed(entry)) {
    compressed_.DropReference(entry & ~kFlagCopied);
    CompressedDescriptor d = DecodeCompressed(entry, bits);
    for (uint64_t c = FirstHostCluster(d, bits); c <= LastHostCluster(d, bits); ++c)
      QD_RETURN_IF_ERROR(Release(c, false));
    return Status::Ok();
  }
  if (L2Offset(entry) == 0) return Status::Ok();
  const bool data = s_.header.extended_l2() ? (bitmap & kAllSubclustersAllocated) != 0 : !(entry & kFlagZero);
  return Release(L2Offset(entry) >> bits, data);
}

// Whether cluster c, which the index names for digest's fingerprint, holds
// data with this digest. The index names candidates: what this session
// wrote or hashed the digest log knows, anything else (the stored table's
// word) is read and hashed the first time. A stale entry leaves the index;
// another digest with the same fingerprint stays, and is only no match.
Result<bool> Writer::Believe(uint64_t c, const Digest& digest) {
  std::optional<Digest> known = digests_.Get(c);
  if (!known) {
    QD_RETURN_IF_ERROR(ReadCluster(c));
    known = Sha256(scratch_);
    digests_.Put(c, *known);
  }
  if (*known == digest) return true;
  if (FingerprintOf(*known) != FingerprintOf(digest)) {
    QD_RETURN_IF_ERROR(index_.Remove(digest, c).status());
    QD_RETURN_IF_ERROR(index_.Insert(*known, c).status());  // what c does hold is known now
  }
  return false;
}

// Whether host cluster c, which the index names for w's digest, may take
// one more reference. A stale entry (index entries are never trusted beyond
// what they were built from) leaves the index.
Result<Writer::Share> Writer::CanShare(uint64_t c, const ClusterWrite& w) {
  QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(c));
  if (rc == 0 || s_.meta.IsTable(c * s_.cs()) || s_.meta.FixedStructureAt(c * s_.cs())) {
    QD_RETURN_IF_ERROR(index_.Remove(w.digest, c).status());
    return Share::kStale;
  }
  if (rc + 1 > ShareLimit(s_.header)) return Share::kNo;
  QD_ASSIGN_OR_RETURN(bool believed, Believe(c, w.digest));
  if (!believed) return Share::kStale;
  if (s_.verify) {
    QD_RETURN_IF_ERROR(ReadCluster(c));
    if (std::memcmp(scratch_.data(), w.data.data(), s_.cs()) != 0) return Share::kNo;
  }
  return Share::kYes;
}

// The host cluster to link w to, if any: the index's copies in turn (the
// newest first), past those that are full. A stale one leaves the index,
// and the copies are asked for again.
Result<std::optional<uint64_t>> Writer::FindShareable(const ClusterWrite& w) {
  std::vector<uint64_t> stale;  // never asked about twice, whatever the index says
  for (bool again = true; again;) {
    again = false;
    QD_ASSIGN_OR_RETURN(std::vector<uint64_t> copies, index_.FindAll(w.digest));
    for (uint64_t c : copies) {
      if (std::find(stale.begin(), stale.end(), c) != stale.end()) continue;
      QD_ASSIGN_OR_RETURN(Share share, CanShare(c, w));
      if (share == Share::kYes) return std::optional<uint64_t>(c);
      if (share == Share::kStale) {
        stale.push_back(c);
        again = true;
        break;
      }
    }
  }
  return std::optional<uint64_t>();
}

Status Writer::PrepareL2(uint64_t guest_cluster) {
  ClusterMap& map = *s_.map;
  const uint64_t l1_index = guest_cluster / s_.header.l2_entries();
  if (l1_index >= map.l1().size())
    return Status::InvalidArgument(fmt::format("guest cluster {} is beyond the L1 table", guest_cluster));
  const uint64_t l1e = map.l1()[l1_index];
  if (L1Offset(l1e) == 0) {
    QD_ASSIGN_OR_RETURN(uint64_t table, refcounts_->Allocate());
    return map.AddTable(l1_index, table);
  }
  if (l1e & kFlagCopied) return Status::Ok();
  QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(L1Offset(l1e) >> s_.header.cluster_bits));
  if (rc == 1) return map.SetL1Copied(l1_index);  // a stale flag: the table is ours alone
  return CopyL2Table(l1_index);
}

// Copy on write of an L2 table that another L1 entry also references. The
// data keeps its refcounts: a reference is a path L1 entry -> L2 table ->
// entry, and the copy takes over exactly the paths through our L1 entry.
Status Writer::CopyL2Table(uint64_t l1_index) {
  ClusterMap& map = *s_.map;
  const uint64_t old_table = L1Offset(map.l1()[l1_index]);
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, map.cache().Get(old_table));
  const TableCache::Table copy = *t;
  QD_ASSIGN_OR_RETURN(uint64_t table, refcounts_->Allocate());
  QD_RETURN_IF_ERROR(map.AddTable(l1_index, table));
  QD_ASSIGN_OR_RETURN(TableCache::Table * fresh, map.cache().Get(table));
  *fresh = copy;
  map.cache().MarkDirty(table);
  QD_RETURN_IF_ERROR(Release(old_table >> s_.header.cluster_bits, false));
  fix_l1_copied_ = true;  // the table's other user may now be its only one
  return Status::Ok();
}

Status Writer::WriteOne(const ClusterWrite& in) {
  const uint64_t cs = s_.cs();
  ClusterWrite w = in;
  if (w.zero && v2_ && s_.backing) {
    // Version 2 has no zero flag: over a backing file, zeros are data.
    w.zero = false;
    w.digest = Sha256(w.data);
  }
  const bool extended = s_.header.extended_l2();
  QD_ASSIGN_OR_RETURN(uint64_t old, s_.map->GetEntry(w.guest_cluster));
  QD_ASSIGN_OR_RETURN(uint64_t old_bitmap, s_.map->GetBitmap(w.guest_cluster));
  ++stats_.clusters_written;
  uint64_t entry, bitmap = 0;
  if (w.zero) {
    ++stats_.zero_clusters;
    // Unallocated reads as zero unless a backing file would show through.
    if (extended) {
      entry = 0;
      bitmap = s_.backing ? kAllSubclustersZero : 0;
    } else {
      entry = s_.backing ? kFlagZero : 0;
    }
    if (old == entry && old_bitmap == bitmap) return Status::Ok();
  } else {
    // A whole cluster of data: every subcluster allocated, so the guest
    // reads exactly the host cluster's bytes (whose digest the index holds).
    bitmap = extended ? kAllSubclustersAllocated : 0;
    if (!IsCompressed(old) && !(old & kFlagZero) && L2Offset(old) && old_bitmap == bitmap) {
      QD_ASSIGN_OR_RETURN(std::vector<uint64_t> copies, index_.FindAll(w.digest));
      const uint64_t now = L2Offset(old) / cs;
      if (std::find(copies.begin(), copies.end(), now) != copies.end()) {
        QD_ASSIGN_OR_RETURN(bool same, Believe(now, w.digest));
        if (same) {
          ++stats_.dedup_hits;  // the same data again: nothing changes
          return Status::Ok();
        }
      }
    }
    QD_ASSIGN_OR_RETURN(std::optional<uint64_t> hit, FindShareable(w));
    std::optional<uint64_t> compressed;  // no uncompressed copy: a compressed one?
    if (!hit) {
      QD_ASSIGN_OR_RETURN(compressed, CompressedEntryFor(w, old));
      if (compressed == old) return Status::Ok();  // the same data again
    }
    if (hit) {
      QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Adjust(*hit, +1));
      if (rc == 2) copied_fixups_.Insert(*hit);
      entry = *hit * cs;
      NoteLink(w.guest_cluster, old);
      ++stats_.dedup_hits;
    } else if (compressed) {
      entry = *compressed;
      bitmap = 0;  // a compressed cluster's subcluster bitmap must be zero
    } else {
      QD_ASSIGN_OR_RETURN(uint64_t host, refcounts_->Allocate());
      QD_RETURN_IF_ERROR(s_.meta.CheckDataWrite(host));
      QD_RETURN_IF_ERROR(data_.Write(host, w.data));
      digests_.Put(host / cs, w.digest);
      s_.map->NoteFileEnd(host + cs);
      QD_ASSIGN_OR_RETURN(bool indexed, index_.Insert(w.digest, host / cs));
      entry = host | kFlagCopied;
      ++stats_.new_clusters;
      stats_.unindexed_clusters += !indexed;  // a later copy of it is stored again
    }
    index_changed_ = true;
  }
  QD_RETURN_IF_ERROR(PrepareL2(w.guest_cluster));
  QD_RETURN_IF_ERROR(s_.map->SetEntry(w.guest_cluster, entry, bitmap));
  return ReleaseEntry(old, old_bitmap);
}

Status Writer::NoteGuestWrite(uint64_t offset, uint64_t len) {
  if (len == 0) return Status::Ok();
  return Guarded([&] {
    QD_RETURN_IF_ERROR(BeginChange());
    if (bitmaps_) bitmaps_->Note(offset, len);
    return Status::Ok();
  });
}

Status Writer::WriteClusters(std::span<const ClusterWrite> clusters, bool mark) {
  const uint64_t guest_clusters = (s_.header.virtual_size + s_.cs() - 1) / s_.cs();
  for (const ClusterWrite& w : clusters)
    if (w.guest_cluster >= guest_clusters || w.data.size() != s_.cs())
      return Status::InvalidArgument("cluster write outside the image");
  return Guarded([&] {
    QD_RETURN_IF_ERROR(BeginChange());
    if (mark && bitmaps_ && !bitmaps_->empty())
      for (const ClusterWrite& w : clusters)
        bitmaps_->Note(w.guest_cluster * s_.cs(), std::min(s_.cs(), s_.header.virtual_size - w.guest_cluster * s_.cs()));
    for (const ClusterWrite& w : clusters) {
      QD_RETURN_IF_ERROR(WriteOne(w));
      QD_RETURN_IF_ERROR(FlushIfCachesFull());
    }
    return Status::Ok();
  });
}

Status Writer::Resize(uint64_t new_size) {
  Header& h = s_.header;
  const uint64_t cs = s_.cs();
  if (new_size > kMaxVirtualSize) return Status::InvalidArgument("image size is too large");
  if (new_size < h.virtual_size) {
    // Only an empty tail may go (convert from a stream trims its headroom).
    for (uint64_t g = (new_size + cs - 1) / cs; g < (h.virtual_size + cs - 1) / cs; ++g) {
      QD_ASSIGN_OR_RETURN(uint64_t e, s_.map->GetEntry(g));
      if (e != 0) return Status::Unsupported("shrinking the image would discard data");
    }
  }
  const uint64_t need = L1EntriesFor(new_size, h);
  uint64_t entries = std::max<uint64_t>(need, uint64_t(h.l1_size) * 2);
  entries = std::min<uint64_t>(entries, kMaxL1Bytes / 8);
  if (need > entries) return Status::InvalidArgument("image size needs an L1 table larger than 32 MiB");
  {
    // As QEMU: a bitmap's table is sized for the virtual size.
    QD_ASSIGN_OR_RETURN(auto bitmaps, ReadBitmapDirectory(*s_.file, h, s_.file_size));
    if (!bitmaps.empty()) return Status::Unsupported("an image with persistent bitmaps cannot be resized");
  }
  return Guarded([&] {
    QD_RETURN_IF_ERROR(BeginChange());
    if (need > h.l1_size) {
      const uint64_t clusters = (entries * 8 + cs - 1) / cs;
      QD_ASSIGN_OR_RETURN(uint64_t at, refcounts_->AllocateRange(clusters));
      const uint64_t old_at = h.l1_offset, old_clusters = (uint64_t(h.l1_size) * 8 + cs - 1) / cs;
      h.l1_offset = at;
      h.l1_size = uint32_t(entries);
      s_.map->MoveL1(uint32_t(entries));
      s_.map->NoteFileEnd(at + clusters * cs);
      for (uint64_t i = 0; i < old_clusters; ++i) QD_RETURN_IF_ERROR(Release(old_at / cs + i, false));
    }
    h.virtual_size = new_size;
    header_changed_ = true;
    return FlushIfCachesFull();
  });
}

// Sets COPIED on every L2 entry exactly when its cluster's refcount is 1,
// for the clusters whose refcount crossed 1 since the last fix-up (and on
// the L1 entries, after an L2 table was copied).
Status Writer::FixCopiedFlags(CopiedPass pass) {
  ClusterMap& map = *s_.map;
  const uint32_t bits = s_.header.cluster_bits;
  const bool set = pass != CopiedPass::kClearOnly, clear = pass != CopiedPass::kSetOnly;
  if (fix_l1_copied_ && set) {
    for (uint64_t i = 0; i < map.l1().size(); ++i) {
      if (!L1Offset(map.l1()[i]) || (map.l1()[i] & kFlagCopied)) continue;
      QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(L1Offset(map.l1()[i]) >> bits));
      if (rc == 1) QD_RETURN_IF_ERROR(map.SetL1Copied(i));
    }
    fix_l1_copied_ = false;
  }
  if (copied_fixups_.empty() && !fix_all_copied_) return Status::Ok();
  for (uint64_t i = 0; i < map.l1().size(); ++i) {
    const uint64_t table = L1Offset(map.l1()[i]);
    // A shared table is copied before it changes; its flags stay as they are.
    if (!table || !(map.l1()[i] & kFlagCopied)) continue;
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, map.cache().Get(table));
    bool changed = false;
    for (uint64_t j = 0; j < s_.header.l2_entries(); ++j) {
      uint8_t* p = t->data() + j * s_.header.l2_entry_bytes();
      uint64_t e = LoadBe64(p);
      if (IsCompressed(e) || L2Offset(e) == 0) continue;
      if (!fix_all_copied_ && !copied_fixups_.Contains(L2Offset(e) >> bits)) continue;
      QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(L2Offset(e) >> bits));
      uint64_t want = rc == 1 ? (e | kFlagCopied) : (e & ~kFlagCopied);
      if ((want & kFlagCopied) ? !set : !clear) continue;
      if (want != e) {
        StoreBe64(p, want);
        changed = true;
      }
    }
    if (changed) map.cache().MarkDirty(table);
    // Each table's fix-up is whole: a safe point to write back a full cache
    // (version 2 runs its fix-ups inside its flush: the cache just grows).
    if (pass == CopiedPass::kBoth) QD_RETURN_IF_ERROR(FlushIfCachesFull());
  }
  if (!set) return Status::Ok();  // the set pass still needs the list
  copied_fixups_.Clear();
  fix_all_copied_ = false;
  return Status::Ok();
}

Status Writer::FlushIfCachesFull() {
  if (!s_.map->cache().over_capacity() && !refcounts_->cache().over_capacity()) return Status::Ok();
  return FlushState();
}

Status Writer::FlushState() {
  if (v2_) return FlushStateV2();
  QD_RETURN_IF_ERROR(data_.Flush());
  if (!marked_dirty_) return Status::Ok();
  QD_RETURN_IF_ERROR(s_.file->Sync());
  QD_RETURN_IF_ERROR(refcounts_->WriteBlocks());
  QD_RETURN_IF_ERROR(s_.map->WriteTables());
  QD_RETURN_IF_ERROR(s_.file->Sync());
  QD_RETURN_IF_ERROR(refcounts_->WriteTable());
  QD_RETURN_IF_ERROR(s_.map->WriteL1());
  QD_RETURN_IF_ERROR(s_.file->Sync());
  // A moved table is on disk before the header points at it.
  if (refcounts_->header_dirty() || header_changed_) {
    QD_RETURN_IF_ERROR(WriteHeader(s_));
    QD_RETURN_IF_ERROR(s_.file->Sync());
    refcounts_->clear_header_dirty();
    header_changed_ = false;
  }
  // No L2 entry on disk points at these any more.
  return PunchFreed(refcounts_->ReleasePendingFrees());
}

// Gives freed clusters' space back to the file system, as QEMU does with
// discard=unmap. Those at the end go when Close cuts the file.
Status Writer::PunchFreed(std::vector<uint64_t> clusters) {
  const uint64_t cs = s_.cs();
  if (closing_) {
    // Past the last allocated cluster and the stored table, Close cuts the
    // file (or a fresh table covers it): no hole needed.
    QD_ASSIGN_OR_RETURN(uint64_t end, refcounts_->EndCluster());
    end = std::max(end, (reserved_index_.first + reserved_index_.second + cs - 1) / cs);
    std::erase_if(clusters, [&](uint64_t c) { return c >= end; });
  }
  std::sort(clusters.begin(), clusters.end());
  for (size_t i = 0; i < clusters.size();) {
    size_t j = i + 1;
    while (j < clusters.size() && clusters[j] == clusters[j - 1] + 1) ++j;
    QD_RETURN_IF_ERROR(s_.file->PunchHole(clusters[i] * cs, (j - i) * cs));
    i = j;
  }
  return Status::Ok();
}

Status Writer::Flush() {
  return Guarded([&] {
    if (!v2_) QD_RETURN_IF_ERROR(FixCopiedFlags());
    return FlushState();
  });
}

Status Writer::Close() {
  if (!marked_dirty_ && !index_changed_ && failed_.ok()) {
    // Nothing written: the file is as the start vetted it, if nobody else
    // wrote it meanwhile.
    if (open_stamp_ && s_.file->Stamp() == open_stamp_) RememberConsistent();
    return Status::Ok();
  }
  return Guarded([&] {
    QD_RETURN_IF_ERROR(BeginChange());
    if (!v2_) QD_RETURN_IF_ERROR(FixCopiedFlags());
    if (bitmaps_) QD_RETURN_IF_ERROR(bitmaps_->WriteMarks(*refcounts_));
    // Frees first, so that a fresh index table goes right after the data
    // and what was freed at the end is cut off, not punched.
    closing_ = true;
    QD_RETURN_IF_ERROR(FlushState());
    if (!v2_) {
      bool placed = false;
      QD_RETURN_IF_ERROR(StoreIndex(placed));
      if (placed) QD_RETURN_IF_ERROR(FlushState());  // the refcount blocks covering the table
    }
    if (bitmaps_) {
      // Marks and their clusters' refcounts are on disk: consistent again.
      QD_RETURN_IF_ERROR(bitmaps_->ClearInUse());
      QD_RETURN_IF_ERROR(s_.file->Sync());
    }
    if (v2_) {
      // No autoclear bit could tell a later reader that QEMU wrote the
      // image after us, and QEMU keeps our extension when it rewrites the
      // header: a stored index would go stale unnoticed. So a version 2
      // image keeps no index (the next session rebuilds it from the data:
      // slower, never wrong).
      QD_ASSIGN_OR_RETURN(uint64_t end, refcounts_->EndCluster());
      QD_RETURN_IF_ERROR(s_.file->Truncate(std::max<uint64_t>(end * s_.cs(), s_.cs())));
      QD_RETURN_IF_ERROR(s_.file->Sync());
      marked_dirty_ = false;
      index_changed_ = false;
      RememberConsistent();
      return Status::Ok();
    }
    QD_ASSIGN_OR_RETURN(uint64_t end, refcounts_->EndCluster());
    uint64_t file_end = end * s_.cs();
    if (s_.header.dedup && s_.header.dedup->index_offset)
      file_end = std::max(file_end, s_.header.dedup->index_offset + IndexTableBytes(s_.header.dedup->index_buckets));
    QD_RETURN_IF_ERROR(s_.file->Truncate(std::max<uint64_t>(file_end, s_.cs())));
    QD_RETURN_IF_ERROR(s_.file->Sync());
    s_.header.incompatible &= ~kIncompatDirty;
    QD_RETURN_IF_ERROR(WriteHeader(s_));
    QD_RETURN_IF_ERROR(s_.file->Sync());
    marked_dirty_ = false;
    index_changed_ = false;
    RememberConsistent();
    return Status::Ok();
  });
}

void Writer::RememberConsistent() {
  if (!failed_.ok()) return;
  const std::optional<VettedStamps> stamps = ProcessVettedStamps();
  if (!stamps) return;
  if (std::optional<FileStamp> now = s_.file->Stamp()) stamps->Record(*now);
}

// The index's changes go into the stored table in place when it takes
// them; otherwise a fresh table goes past everything allocated, where QEMU
// sees only free space. The header, written last, says which.
Status Writer::StoreIndex(bool& placed) {
  const uint64_t cs = s_.cs();
  // A refcount block that had to go where the stored table lies has
  // overwritten some of it, unseen.
  if (refcounts_->overran_reserved()) index_.NoteInexact();
  auto in_use = [&](uint64_t c) -> Result<bool> {
    QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(c));
    return rc != 0 || s_.meta.IsTable(c * cs) || s_.meta.FixedStructureAt(c * cs);
  };
  // The stored table's clusters have refcount 0 and are reserved; one in
  // use after all makes the table move.
  auto may_write = [&](uint64_t offset, uint64_t len) -> Status {
    for (uint64_t c = offset / cs; c < (offset + len + cs - 1) / cs; ++c) {
      QD_ASSIGN_OR_RETURN(bool used, in_use(c));
      if (used) return Status::Corruption(fmt::format("index cluster {} is in use", c));
    }
    return Status::Ok();
  };
  // A fresh table's clusters are allocated, so that every refcount block
  // covering them exists (placed after them) and none is ever put inside
  // the table later; then they are given back: the table has refcount 0.
  auto place = [&](uint64_t bytes) -> Result<uint64_t> {
    placed = true;
    const uint64_t n = (bytes + cs - 1) / cs;
    QD_ASSIGN_OR_RETURN(uint64_t at, refcounts_->AllocateRange(n));
    for (uint64_t c = at / cs; c < at / cs + n; ++c) QD_RETURN_IF_ERROR(refcounts_->Set(c, 0));
    return at;
  };
  QD_ASSIGN_OR_RETURN(std::optional<DedupExtension> ext, index_.Store(*s_.file, may_write, place));
  if (ext) {
    s_.header.dedup = *ext;
    s_.header.dedup->free_hint = refcounts_->LowestFree();
    s_.header.dedup->compressed = compressed_.size();
    s_.header.autoclear |= kAutoclearDedupInSync;
  } else {
    s_.header.dedup = DedupExtension{};  // rebuilt from the data on the next write
  }
  // Saturating: a hostile header's count must not wrap to a small one.
  s_.header.dedup->memory_misses = std::min(prior_misses_, UINT64_MAX - stats_.unindexed_clusters) +
                                   stats_.unindexed_clusters;
  // A table left behind gives its space back (what lies past the end goes
  // when the file is cut).
  const auto [old_at, old_bytes] = reserved_index_;
  if (old_bytes && (!ext || ext->index_offset != old_at)) {
    QD_ASSIGN_OR_RETURN(uint64_t end, refcounts_->EndCluster());
    for (uint64_t c = old_at / cs; c < std::min(end, (old_at + old_bytes + cs - 1) / cs); ++c) {
      QD_ASSIGN_OR_RETURN(bool used, in_use(c));
      if (!used) QD_RETURN_IF_ERROR(s_.file->PunchHole(c * cs, cs));
    }
  }
  return Status::Ok();
}

Status WriteHeader(ImageState& s) {
  QD_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, EncodeHeader(s.header));
  return s.file->WriteAt(0, bytes);
}

}  // namespace qcow2dedup
