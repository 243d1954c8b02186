// In-place dedup of an image others wrote: relink, then free. Every change
// is an ordinary write-path change (an L2 entry now points at an identical
// copy), so the crash safety is the write path's: frees wait for the flush
// that puts the relinked L2 tables on disk.
#include <algorithm>
#include <cstring>
#include <tuple>
#include <optional>
#include <unordered_map>

#include "image/image_state.h"
#include "image/writer.h"

namespace qcow2dedup {

Result<Writer::DedupCounts> Writer::Deduplicate(const ProgressFn& hashing, const ProgressFn& relinking,
                                                uint64_t flush_interval) {
  // Whatever index was loaded, hash every stored copy now: the relinking
  // must rest on what the clusters hold today.
  if (!index_hashed_) QD_RETURN_IF_ERROR(RebuildIndex(hashing));
  index_hashed_ = true;
  index_changed_ = true;
  const uint64_t cs = s_.cs();
  const Digest zero = Sha256(std::vector<uint8_t>(cs, 0));
  // Version 2 has no zero flag: over a backing file zeros stay data (one copy).
  const bool unmap_zeros = !(v2_ && s_.backing);
  // For each copy that goes: the copy kept (none for zeros), and its digest.
  struct Move {
    std::optional<uint64_t> keep;
    Digest digest;
  };
  std::unordered_map<uint64_t, Move> moves;
  // Which host clusters have a move: most guest entries have none, and are
  // passed over on a bit rather than a hash lookup.
  std::vector<bool> moving(s_.file_size / s_.cs() + 1);
  auto is_moving = [&](uint64_t c) { return c < moving.size() ? bool(moving[c]) : moves.count(c) > 0; };
  {
    // Copies of one data lie together in the index (fingerprint order, the
    // lowest cluster first). Within a fingerprint the digest log tells data
    // apart: another digest with the same fingerprint is no copy. A
    // fingerprint of one cluster moves nothing, unless it may be zeros.
    const Fingerprint zero_fp = FingerprintOf(zero);
    std::optional<Fingerprint> last;
    std::vector<uint64_t> alike;  // the clusters of fingerprint last
    auto settle = [&] {
      std::vector<std::pair<Digest, uint64_t>> group;
      if (alike.size() > 1 || (unmap_zeros && last == zero_fp)) {
        for (uint64_t c : alike) {
          if (auto d = digests_.Get(c)) group.emplace_back(*d, c);  // unknown: left as it is
        }
      }
      alike.clear();
      std::sort(group.begin(), group.end());
      for (size_t i = 0, first = 0; i < group.size(); ++i) {
        if (group[i].first != group[first].first) first = i;
        const bool zeros = unmap_zeros && group[i].first == zero;
        if (!zeros && i == first) continue;  // the copy kept
        Move m{std::nullopt, group[i].first};
        if (!zeros) m.keep = group[first].second;
        moves.emplace(group[i].second, m);
        if (group[i].second < moving.size()) moving[group[i].second] = true;
      }
    };
    index_.memory().ForEach([&](Fingerprint f, uint64_t c) {
      if (last != f) settle();
      last = f;
      alike.push_back(c);
    });
    settle();
  }
  // Compressed copies (qemu-img convert -c compresses every cluster apart):
  // each goes to the lowest compressed copy of the same data, zeros nowhere.
  std::unordered_map<uint64_t, std::optional<uint64_t>> compressed_moves;
  {
    const uint32_t bits = s_.header.cluster_bits;
    auto offset = [bits](uint64_t d) { return DecodeCompressed(d, bits).offset; };
    std::unordered_map<Digest, uint64_t, CompressedIndex::DigestHash> lowest;
    compressed_.ForEachHashed([&](uint64_t d, const Digest& digest) {
      auto [it, fresh] = lowest.emplace(digest, d);
      if (!fresh && offset(d) < offset(it->second)) it->second = d;
    });
    compressed_.ForEachHashed([&](uint64_t d, const Digest& digest) {
      if (digest == zero) compressed_moves.emplace(d, std::nullopt);
      else if (lowest[digest] != d) compressed_moves.emplace(d, lowest[digest]);
    });
  }
  DedupCounts counts;
  // The clusters left out of the index are left as they are: any duplicate
  // that stays is among them, so they are what the header counts now.
  counts.unindexed = index_.refused();
  counts.stored = stored_clusters() + counts.unindexed;
  prior_misses_ = counts.unindexed - std::min(counts.unindexed, stats_.unindexed_clusters);
  if (moves.empty() && compressed_moves.empty()) return counts;
  Status st = Guarded([&] {
    QD_RETURN_IF_ERROR(BeginChange());
    const uint64_t guest_clusters = (s_.header.virtual_size + cs - 1) / cs;
    const uint64_t tables = s_.map->l1().size();
    const uint64_t per = s_.header.l2_entries(), entry_bytes = s_.header.l2_entry_bytes();
    for (uint64_t i = 0; i < tables; ++i) {
      if (!L1Offset(s_.map->l1()[i])) continue;
      // Most entries have nothing to move: they are passed over in the
      // table itself, fetched again only after a change (which may move it).
      TableCache::Table* table = nullptr;
      for (uint64_t g = i * per; g < std::min(guest_clusters, (i + 1) * per); ++g) {
        if (!table) {
          QD_ASSIGN_OR_RETURN(table, s_.map->cache().Get(L1Offset(s_.map->l1()[i])));
        }
        const uint64_t raw = LoadBe64(table->data() + (g - i * per) * entry_bytes);
        if (!IsCompressed(raw) && ((raw & kFlagZero) || L2Offset(raw) == 0 || !is_moving(L2Offset(raw) / cs)))
          continue;
        table = nullptr;
        QD_ASSIGN_OR_RETURN(uint64_t old, s_.map->GetEntry(g));
        QD_ASSIGN_OR_RETURN(uint64_t bitmap, s_.map->GetBitmap(g));
        if (IsCompressed(old)) {
          QD_RETURN_IF_ERROR(RelinkCompressed(g, old, bitmap, compressed_moves, counts));
          continue;
        }
        if ((old & kFlagZero) || L2Offset(old) == 0) continue;
        // A partly allocated cluster reads other bytes than its host cluster holds.
        if (s_.header.extended_l2() && bitmap != kAllSubclustersAllocated) continue;
        auto it = moves.find(L2Offset(old) / cs);
        if (it == moves.end()) continue;
        uint64_t entry;
        if (!it->second.keep) {
          // A backing file must not show through.
          entry = s_.backing && !s_.header.extended_l2() ? kFlagZero : 0;
          bitmap = s_.backing && s_.header.extended_l2() ? kAllSubclustersZero : 0;
          ++counts.zeroed;
        } else {
          const uint64_t keep = *it->second.keep;
          QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(keep));
          if (rc + 1 > ShareLimit(s_.header)) continue;  // stays a second copy
          QD_RETURN_IF_ERROR(refcounts_->Adjust(keep, +1).status());
          if (rc + 1 == 2) copied_fixups_.Insert(keep);
          entry = keep * cs;
          NoteLink(g, old);
          ++counts.relinked;
        }
        QD_RETURN_IF_ERROR(PrepareL2(g));
        QD_RETURN_IF_ERROR(s_.map->SetEntry(g, entry, bitmap));
        QD_RETURN_IF_ERROR(Release(L2Offset(old) / cs, true, &it->second.digest));
        QD_RETURN_IF_ERROR(FlushIfCachesFull());
      }
      // Between two L2 tables no change is half done: a safe point to flush.
      const uint64_t table_bytes = s_.header.l2_entries() * cs;
      if (flush_interval && (i + 1) % std::max<uint64_t>(1, flush_interval / table_bytes) == 0) {
        if (!v2_) QD_RETURN_IF_ERROR(FixCopiedFlags());
        QD_RETURN_IF_ERROR(FlushState());
      }
      if (relinking) relinking(i + 1, tables);
    }
    return Status::Ok();
  });
  QD_RETURN_IF_ERROR(st);
  return counts;
}

// Guest cluster g, whose entry old is compressed: linked to the copy kept
// for its data, or unmapped for zeros.
Status Writer::RelinkCompressed(uint64_t g, uint64_t old, uint64_t old_bitmap,
                                const std::unordered_map<uint64_t, std::optional<uint64_t>>& moves,
                                DedupCounts& counts) {
  auto it = moves.find(old & ~kFlagCopied);
  if (it == moves.end()) return Status::Ok();
  uint64_t entry, bitmap = 0;
  if (!it->second) {
    entry = s_.backing && !s_.header.extended_l2() ? kFlagZero : 0;
    bitmap = s_.backing && s_.header.extended_l2() ? kAllSubclustersZero : 0;
    ++counts.zeroed;
  } else {
    QD_ASSIGN_OR_RETURN(bool room, CompressedHasRoom(*it->second));
    if (!room) return Status::Ok();  // stays a second copy
    QD_RETURN_IF_ERROR(AddCompressedReference(*it->second));
    entry = *it->second;
    ++counts.relinked;
  }
  QD_RETURN_IF_ERROR(PrepareL2(g));
  QD_RETURN_IF_ERROR(s_.map->SetEntry(g, entry, bitmap));
  QD_RETURN_IF_ERROR(ReleaseEntry(old, old_bitmap));
  return FlushIfCachesFull();
}

}  // namespace qcow2dedup
