// The dedup write path. Data goes to new clusters only (never in place), and
// a freed cluster is reused only after the L2 change that freed it is on
// disk, so that after a crash every L2 entry shows old or new data.
#include "image/writer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "check/context.h"
#include "check/passes.h"
#include "dedup/hasher.h"
#include "dedup/index_store.h"

namespace qcow2dedup {
namespace {

// Share a cluster only while its refcount stays at or below this, far from
// the width's maximum.
// An internal snapshot (qemu-img snapshot -c) adds one reference per L2
// entry, doubling a shared cluster's refcount: so share only up to half.
uint64_t ShareLimit(const Header& h) { return std::max<uint64_t>(1, h.max_refcount() / 2); }

// Marks the image dirty and the index out of sync on disk before the first
// change, so a crash from here on is repaired and the index rebuilt.
Status BeginChange(ImageState& s) {
  if (s.marked_dirty) return Status::Ok();
  s.header.incompatible |= kIncompatDirty;
  s.header.autoclear &= ~kAutoclearDedupInSync;
  QD_RETURN_IF_ERROR(WriteHeader(s));
  QD_RETURN_IF_ERROR(s.file->Sync());
  s.marked_dirty = true;
  return Status::Ok();
}

// Reads host cluster c into s.scratch.
Status ReadCluster(ImageState& s, uint64_t c) {
  if (s.data.Overlaps(c * s.cs(), s.cs())) QD_RETURN_IF_ERROR(s.data.Flush());
  s.scratch.resize(s.cs());
  return s.file->ReadAt(c * s.cs(), s.scratch);
}

// Drops one reference to host cluster c; at zero its hash leaves the index.
Status Release(ImageState& s, uint64_t cluster, bool data) {
  QD_ASSIGN_OR_RETURN(uint64_t left, s.refcounts->Adjust(cluster, -1));
  if (left == 1) s.copied_fixups.Insert(cluster);
  if (left != 0) return Status::Ok();
  ++s.stats.freed_clusters;
  if (!data) return Status::Ok();
  // Its bytes are still on disk (freed clusters wait for the next flush).
  QD_RETURN_IF_ERROR(ReadCluster(s, cluster));
  if (!s.index.Remove(Sha256(s.scratch), cluster)) s.index.RemoveCluster(cluster);
  s.index_changed = true;
  return Status::Ok();
}

// Releases what an L2 entry referenced.
Status ReleaseEntry(ImageState& s, uint64_t entry) {
  const uint32_t bits = s.header.cluster_bits;
  if (IsCompressed(entry)) {
    CompressedDescriptor d = DecodeCompressed(entry, bits);
    for (uint64_t c = FirstHostCluster(d, bits); c <= LastHostCluster(d, bits); ++c)
      QD_RETURN_IF_ERROR(Release(s, c, false));
    return Status::Ok();
  }
  if (L2Offset(entry) != 0) return Release(s, L2Offset(entry) >> bits, !(entry & kFlagZero));
  return Status::Ok();
}

enum class Share { kYes, kNo, kStale };

// Whether the index's claim that cluster c holds data with this digest can
// be believed. An entry loaded from disk is checked against the data the
// first time it is used; a wrong one leaves the index.
Result<bool> Believe(ImageState& s, uint64_t c, const Digest& digest) {
  if (!s.unverified.Contains(c)) return true;
  QD_RETURN_IF_ERROR(ReadCluster(s, c));
  s.unverified.Erase(c);
  const Digest actual = Sha256(s.scratch);
  if (std::memcmp(actual.data(), digest.data(), DedupIndex::kKeyBytes) == 0) return true;
  s.index.RemoveCluster(c);  // whatever else it claims about c is as wrong
  s.index.Insert(actual, c);  // and what c does hold is now known
  return false;
}

// Whether host cluster c, which the index names for w's digest, may take
// one more reference. A stale entry (index entries are never trusted beyond
// what they were built from) leaves the index.
Result<Share> CanShare(ImageState& s, uint64_t c, const ClusterWrite& w) {
  QD_ASSIGN_OR_RETURN(uint64_t rc, s.refcounts->Get(c));
  if (rc == 0 || s.meta.IsTable(c * s.cs()) || s.meta.FixedStructureAt(c * s.cs())) {
    s.index.Remove(w.digest, c);
    return Share::kStale;
  }
  if (rc + 1 > ShareLimit(s.header)) return Share::kNo;
  QD_ASSIGN_OR_RETURN(bool believed, Believe(s, c, w.digest));
  if (!believed) return Share::kStale;
  if (s.verify) {
    QD_RETURN_IF_ERROR(ReadCluster(s, c));
    if (std::memcmp(s.scratch.data(), w.data.data(), s.cs()) != 0) return Share::kNo;
  }
  return Share::kYes;
}

// The host cluster to link w to, if any: hit (the index's copy), or another
// one when that copy turns out stale.
Result<std::optional<uint64_t>> FindShareable(ImageState& s, const ClusterWrite& w, std::optional<uint64_t> hit) {
  for (; hit; hit = s.index.Find(w.digest)) {
    QD_ASSIGN_OR_RETURN(Share share, CanShare(s, *hit, w));
    if (share == Share::kYes) return hit;
    if (share == Share::kNo) return std::optional<uint64_t>();
  }
  return std::optional<uint64_t>();
}

Status WriteOne(ImageState& s, const ClusterWrite& w) {
  const uint64_t cs = s.cs();
  QD_ASSIGN_OR_RETURN(uint64_t old, s.map->GetEntry(w.guest_cluster));
  ++s.stats.clusters_written;
  uint64_t entry;
  if (w.zero) {
    ++s.stats.zero_clusters;
    // Unallocated reads as zero unless a backing file would show through.
    entry = s.backing ? kFlagZero : 0;
    if (old == entry) return Status::Ok();
  } else {
    std::optional<uint64_t> hit = s.index.Find(w.digest);
    if (hit && !IsCompressed(old) && !(old & kFlagZero) && L2Offset(old) == *hit * cs) {
      QD_ASSIGN_OR_RETURN(bool same, Believe(s, *hit, w.digest));
      if (same) {
        ++s.stats.dedup_hits;  // the same data again: nothing changes
        return Status::Ok();
      }
      hit = s.index.Find(w.digest);  // that entry is gone: another copy, if any
    }
    QD_ASSIGN_OR_RETURN(hit, FindShareable(s, w, hit));
    if (hit) {
      QD_ASSIGN_OR_RETURN(uint64_t rc, s.refcounts->Adjust(*hit, +1));
      if (rc == 2) s.copied_fixups.Insert(*hit);
      entry = *hit * cs;
      ++s.stats.dedup_hits;
    } else {
      QD_ASSIGN_OR_RETURN(uint64_t host, s.refcounts->Allocate());
      QD_RETURN_IF_ERROR(s.meta.CheckDataWrite(host));
      QD_RETURN_IF_ERROR(s.data.Write(host, w.data));
      s.map->NoteFileEnd(host + cs);
      s.index.Insert(w.digest, host / cs);
      s.unverified.Erase(host / cs);
      entry = host | kFlagCopied;
      ++s.stats.new_clusters;
    }
    s.index_changed = true;
  }
  QD_RETURN_IF_ERROR(s.map->SetEntry(w.guest_cluster, entry, *s.refcounts));
  return ReleaseEntry(s, old);
}

// Sets COPIED on every L2 entry exactly when its cluster's refcount is 1,
// for the clusters whose refcount crossed 1 since the last fix-up.
Status FixCopiedFlags(ImageState& s) {
  if (s.copied_fixups.empty() && !s.fix_all_copied) return Status::Ok();
  const uint32_t bits = s.header.cluster_bits;
  const auto& l1 = s.map->l1();
  for (uint64_t i = 0; i < l1.size(); ++i) {
    const uint64_t table = L1Offset(l1[i]);
    if (!table) continue;
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, s.map->cache().Get(table));
    bool changed = false;
    for (uint64_t j = 0; j < s.header.l2_entries(); ++j) {
      uint64_t e = LoadBe64(t->data() + j * 8);
      if (IsCompressed(e) || L2Offset(e) == 0) continue;
      if (!s.fix_all_copied && !s.copied_fixups.Contains(L2Offset(e) >> bits)) continue;
      QD_ASSIGN_OR_RETURN(uint64_t rc, s.refcounts->Get(L2Offset(e) >> bits));
      uint64_t want = rc == 1 ? (e | kFlagCopied) : (e & ~kFlagCopied);
      if (want != e) {
        StoreBe64(t->data() + j * 8, want);
        changed = true;
      }
    }
    if (changed) s.map->cache().MarkDirty(table);
  }
  s.copied_fixups.Clear();
  s.fix_all_copied = false;
  return Status::Ok();
}

// Writes everything in the order that keeps a crash repairable: data, then
// refcount blocks and L2 tables, then the L1 and refcount tables and header.
Status FlushState(ImageState& s) {
  QD_RETURN_IF_ERROR(s.data.Flush());
  if (!s.marked_dirty) return Status::Ok();
  QD_RETURN_IF_ERROR(s.file->Sync());
  QD_RETURN_IF_ERROR(s.refcounts->WriteBlocks());
  QD_RETURN_IF_ERROR(s.map->WriteTables());
  QD_RETURN_IF_ERROR(s.file->Sync());
  QD_RETURN_IF_ERROR(s.refcounts->WriteTable());
  QD_RETURN_IF_ERROR(s.map->WriteL1());
  QD_RETURN_IF_ERROR(s.file->Sync());
  // A moved table is on disk before the header points at it.
  if (s.refcounts->header_dirty() || s.header_changed) {
    QD_RETURN_IF_ERROR(WriteHeader(s));
    QD_RETURN_IF_ERROR(s.file->Sync());
    s.refcounts->clear_header_dirty();
    s.header_changed = false;
  }
  s.refcounts->ReleasePendingFrees();
  return Status::Ok();
}

}  // namespace

Status WriteHeader(ImageState& s) {
  QD_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, EncodeHeader(s.header));
  return s.file->WriteAt(0, bytes);
}

// Before the first write, the same reference count that check makes (no
// hashing, metadata only): writing into an image whose tables overlap or
// whose refcounts are too low would spread the damage to good data.
Status VetStructure(ImageState& s) {
  check::Context ctx;
  ctx.file = s.file.get();
  ctx.header = s.header;
  ctx.file_size = s.file_size;
  QD_ASSIGN_OR_RETURN(check::PassResult pass, check::RunPass(ctx, RepairMode::kNone));
  // A COPIED flag left clear by QEMU's copy-on-write of a shared cluster is
  // harmless and mended at our next flush; anything else stops the write.
  uint64_t copied = 0;
  for (const Finding& f : pass.report.findings)
    copied += f.area == FindingArea::kCopiedFlags && f.kind == FindingKind::kError;
  const uint64_t serious = pass.report.corruptions - std::min(copied, pass.report.corruptions) + pass.report.overlaps;
  if (serious > 0 || pass.report.check_errors > 0)
    return Status::Corruption(fmt::format("the image has {} corruptions; repair it with 'check -r all' first",
                                          serious + pass.report.check_errors));
  if (copied) s.fix_all_copied = true;
  return Status::Ok();
}

Status CheckWritableFormat(const Header& h) {
  if (h.version < 3) return Status::Unsupported("writing qcow2 version 2 images is not supported; convert it first");
  if (h.extended_l2()) return Status::Unsupported("writing images with extended L2 entries is not supported");
  if (h.nb_snapshots) return Status::Unsupported("writing images with internal snapshots is not supported");
  if (h.autoclear & kAutoclearBitmaps)
    return Status::Unsupported("writing images with persistent bitmaps is not supported");
  return Status::Ok();
}

Status PrepareForWriting(ImageState& s, const ProgressFn& progress) {
  const Header& h = s.header;
  QD_RETURN_IF_ERROR(CheckWritableFormat(h));
  // Open repairs a dirty image first; one still dirty here is not ours to touch.
  if (h.incompatible & kIncompatDirty)
    return Status::Corruption("the image was not closed cleanly; repair it with 'check -r all' first");
  s.refcounts = std::make_unique<Refcounts>(s.file.get(), &s.header, &s.meta, CacheTables(s.cs()));
  s.map->cache().set_on_full([&s] { return FlushState(s); });
  s.refcounts->cache().set_on_full([&s] { return FlushState(s); });
  QD_RETURN_IF_ERROR(s.refcounts->Load(s.file_size));
  QD_RETURN_IF_ERROR(VetStructure(s));
  QD_ASSIGN_OR_RETURN(bool loaded, LoadIndex(*s.file, h, s.file_size, s.index));
  if (loaded) {
    s.index.ForEach([&](const uint8_t*, uint64_t c) { s.unverified.Insert(c); });
  } else {
    QD_RETURN_IF_ERROR(RebuildIndex(s, progress));
    s.index_changed = true;
    // Someone else wrote the image: QEMU's copy-on-write of a cluster shared
    // twice leaves the other reference's COPIED flag clear. Mend them all.
    s.fix_all_copied = true;
  }
  return Status::Ok();
}

Status RebuildIndex(ImageState& s, const ProgressFn& progress) {
  s.index.Clear();
  const uint64_t cs = s.cs();
  std::vector<uint64_t> clusters;
  const auto& l1 = s.map->l1();
  for (uint64_t i = 0; i < l1.size(); ++i) {
    if (!L1Offset(l1[i])) continue;
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, s.map->cache().Get(L1Offset(l1[i])));
    for (uint64_t j = 0; j < s.header.l2_entries(); ++j) {
      uint64_t e = LoadBe64(t->data() + j * s.header.l2_entry_bytes());
      if (IsCompressed(e) || (e & kFlagZero) || L2Offset(e) == 0) continue;
      if (s.map->CheckDataOffset((i * s.header.l2_entries() + j) * cs, L2Offset(e)).ok())
        clusters.push_back(L2Offset(e) / cs);
    }
  }
  std::sort(clusters.begin(), clusters.end());
  clusters.erase(std::unique(clusters.begin(), clusters.end()), clusters.end());
  // Hash in batches on every core. Every copy goes in, so that freeing one
  // leaves the others findable.
  const size_t batch = std::max<size_t>(64, (8u << 20) / cs);
  std::vector<uint8_t> buf(batch * cs);
  std::vector<Digest> digests(batch);
  std::vector<Status> errors(batch);
  for (size_t start = 0; start < clusters.size(); start += batch) {
    size_t n = std::min(batch, clusters.size() - start);
    ParallelFor(n, 8, [&](size_t k) {
      std::span<uint8_t> c(&buf[k * cs], cs);
      errors[k] = s.file->ReadAt(clusters[start + k] * cs, c);
      digests[k] = Sha256(c);
    });
    for (size_t k = 0; k < n; ++k) {
      QD_RETURN_IF_ERROR(errors[k]);
      s.index.Insert(digests[k], clusters[start + k]);
    }
    if (progress) progress(start + n, clusters.size());
  }
  return Status::Ok();
}

void PrepareClusterWrite(ClusterWrite& w) {
  w.zero = IsAllZero(w.data);
  if (!w.zero) w.digest = Sha256(w.data);
}

Status Image::WriteClusters(std::span<const ClusterWrite> clusters) {
  ImageState& s = *state_;
  if (!s.writable) return Status::InvalidArgument("the image is open read-only");
  QD_RETURN_IF_ERROR(BeginChange(s));
  const uint64_t guest_clusters = (s.header.virtual_size + s.cs() - 1) / s.cs();
  for (const ClusterWrite& w : clusters) {
    if (w.guest_cluster >= guest_clusters || w.data.size() != s.cs())
      return Status::InvalidArgument("cluster write outside the image");
    QD_RETURN_IF_ERROR(WriteOne(s, w));
  }
  return Status::Ok();
}

Status Image::Write(uint64_t offset, std::span<const uint8_t> data) {
  ImageState& s = *state_;
  const uint64_t cs = s.cs();
  if (offset > s.header.virtual_size || data.size() > s.header.virtual_size - offset)
    return Status::InvalidArgument(fmt::format("write of {} bytes at offset {} goes beyond the virtual size {}",
                                               data.size(), offset, s.header.virtual_size));
  // Whole clusters straight from the caller; a partial one completed from
  // what the guest sees now (image, backing file or zeros).
  const size_t batch = std::max<size_t>(16, (4u << 20) / cs);
  std::vector<uint8_t> partial;
  std::vector<ClusterWrite> writes;
  uint64_t pos = offset;
  const uint64_t end = offset + data.size();
  while (pos < end) {
    writes.clear();
    partial.assign(2 * cs, 0);
    int used_partial = 0;
    while (pos < end && writes.size() < batch) {
      const uint64_t cluster = pos / cs, in = pos % cs;
      const uint64_t n = std::min<uint64_t>(cs - in, end - pos);
      ClusterWrite w{cluster, {}, false, {}};
      if (n == cs) {
        w.data = data.subspan(pos - offset, cs);
      } else {
        std::span<uint8_t> buf(&partial[used_partial++ * cs], cs);
        const uint64_t cstart = cluster * cs;
        const uint64_t clen = std::min<uint64_t>(cs, s.header.virtual_size - cstart);
        std::memset(buf.data(), 0, cs);
        QD_RETURN_IF_ERROR(Read(cstart, buf.first(clen)));
        std::memcpy(buf.data() + in, data.data() + (pos - offset), n);
        w.data = buf;
      }
      writes.push_back(w);
      pos += n;
      if (used_partial == 2) break;  // at most a head and a tail per batch
    }
    ParallelFor(writes.size(), 16, [&](size_t i) { PrepareClusterWrite(writes[i]); });
    QD_RETURN_IF_ERROR(WriteClusters(writes));
  }
  return Status::Ok();
}

Status Image::Resize(uint64_t new_size) {
  ImageState& s = *state_;
  Header& h = s.header;
  if (!s.writable) return Status::InvalidArgument("the image is open read-only");
  if (new_size < h.virtual_size) {
    // Only an empty tail may go (convert from a stream trims its headroom).
    const uint64_t cs = s.cs();
    for (uint64_t g = (new_size + cs - 1) / cs; g < (h.virtual_size + cs - 1) / cs; ++g) {
      QD_ASSIGN_OR_RETURN(uint64_t e, s.map->GetEntry(g));
      if (e != 0) return Status::Unsupported("shrinking the image would discard data");
    }
  }
  if (new_size > kMaxVirtualSize) return Status::InvalidArgument("image size is too large");
  QD_RETURN_IF_ERROR(BeginChange(s));
  const uint64_t need = L1EntriesFor(new_size, h);
  if (need > h.l1_size) {
    uint64_t entries = std::max<uint64_t>(need, uint64_t(h.l1_size) * 2);
    entries = std::min<uint64_t>(entries, kMaxL1Bytes / 8);
    if (need > entries) return Status::InvalidArgument("image size needs an L1 table larger than 32 MiB");
    const uint64_t clusters = (entries * 8 + s.cs() - 1) / s.cs();
    QD_ASSIGN_OR_RETURN(uint64_t at, s.refcounts->AllocateRange(clusters));
    const uint64_t old_at = h.l1_offset, old_clusters = (uint64_t(h.l1_size) * 8 + s.cs() - 1) / s.cs();
    h.l1_offset = at;
    h.l1_size = uint32_t(entries);
    s.map->MoveL1(uint32_t(entries));
    s.map->NoteFileEnd(at + clusters * s.cs());
    for (uint64_t i = 0; i < old_clusters; ++i) QD_RETURN_IF_ERROR(Release(s, old_at / s.cs() + i, false));
  }
  h.virtual_size = new_size;
  s.header_changed = true;
  return Status::Ok();
}

Status Image::Flush() {
  ImageState& s = *state_;
  if (!s.writable) return Status::Ok();
  QD_RETURN_IF_ERROR(FixCopiedFlags(s));
  return FlushState(s);
}

Status Image::Close() {
  ImageState& s = *state_;
  if (!s.writable) return Status::Ok();
  if (!s.marked_dirty && !s.index_changed) return Status::Ok();
  QD_RETURN_IF_ERROR(BeginChange(s));
  QD_RETURN_IF_ERROR(Flush());
  // The index goes past the last allocated cluster, where QEMU sees only
  // free space; the header is the last thing written.
  QD_ASSIGN_OR_RETURN(uint64_t end, s.refcounts->EndCluster());
  const uint64_t at = end * s.cs();
  QD_ASSIGN_OR_RETURN(DedupExtension ext, SaveIndex(*s.file, s.index, s.header.cluster_bits, at));
  const uint64_t new_size = ext.index_offset ? at + ext.index_entries * kIndexEntryBytes : at;
  QD_RETURN_IF_ERROR(s.file->Truncate(std::max<uint64_t>(new_size, s.cs())));
  QD_RETURN_IF_ERROR(s.file->Sync());
  s.header.dedup = ext;
  s.header.incompatible &= ~kIncompatDirty;
  s.header.autoclear |= kAutoclearDedupInSync;
  QD_RETURN_IF_ERROR(WriteHeader(s));
  QD_RETURN_IF_ERROR(s.file->Sync());
  s.marked_dirty = false;
  s.index_changed = false;
  return Status::Ok();
}

}  // namespace qcow2dedup
