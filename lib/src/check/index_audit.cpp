#include "check/index_audit.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "dedup/hash_clusters.h"
#include "dedup/hash_compressed.h"
#include "dedup/index.h"
#include "dedup/index_table.h"
#include "dedup/sha256.h"
#include "format/endian.h"

namespace qcow2dedup::check {
namespace {

using Key = std::array<uint8_t, 20>;

Key KeyOf(const uint8_t* p) {
  Key k;
  std::memcpy(k.data(), p, k.size());
  return k;
}

// Equal keys side by side, in some order: integer compares, not memcmp
// calls (a sort of every stored cluster's key is most of the audit's time).
bool KeyBefore(const Key& a, const Key& b) {
  uint64_t x[3] = {}, y[3] = {};
  std::memcpy(x, a.data(), a.size());
  std::memcpy(y, b.data(), b.size());
  return x[0] != y[0] ? x[0] < y[0] : x[1] != y[1] ? x[1] < y[1] : x[2] < y[2];
}

// Data stored more than once: missed dedup, not an error.
uint64_t CountDuplicates(const std::vector<HashedCluster>& hashed, const HashedCompressed& compressed) {
  std::vector<Key> keys;
  keys.reserve(hashed.size() + compressed.active.size());
  for (const HashedCluster& hc : hashed)
    if (hc.active) keys.push_back(hc.key);
  keys.insert(keys.end(), compressed.active.begin(), compressed.active.end());
  std::sort(keys.begin(), keys.end(), KeyBefore);
  uint64_t duplicates = 0;
  for (size_t i = 1; i < keys.size(); ++i) duplicates += keys[i] == keys[i - 1];
  return duplicates;
}

struct StoredEntry {
  uint64_t cluster;
  Fingerprint key;
};

// The stored table's entries, if it is whole: the same placement tests the
// writer makes before it searches the table, and every bucket's check.
Status ReadIndex(Context& ctx, const DedupExtension& ext, std::vector<StoredEntry>& entries) {
  QD_RETURN_IF_ERROR(CheckIndexPlacement(ext, ctx.cs(), ctx.file_size));
  IndexTable table(ctx.file, ext);
  // A failing read is the check's failure, not a verdict on the index.
  QD_RETURN_IF_ERROR(table.ForEach([&](Fingerprint key, uint64_t c) { entries.push_back({c, key}); }));
  if (table.damaged()) return Status::Corruption("a bucket of it does not match its check");
  if (entries.size() != ext.index_entries)
    return Status::Corruption(fmt::format("it holds {} entries, not the {} the header says", entries.size(),
                                          ext.index_entries));
  return Status::Ok();
}

void IndexError(CheckReport& notes, std::string text, std::optional<uint64_t> cluster = std::nullopt) {
  Note(notes, FindingArea::kDedupIndex, FindingKind::kError, std::string(Word(FindingKind::kError)) + " " + text,
       cluster);
}

}  // namespace

Result<std::vector<HashedCluster>> HashDataClusters(Context& ctx, const References& refs,
                                                    const ProgressFn& progress) {
  const uint64_t cs = ctx.cs();
  std::vector<uint64_t> clusters;
  std::vector<bool> active;
  auto a = refs.active_data.begin(), s = refs.snapshot_data.begin();
  while (a != refs.active_data.end() || s != refs.snapshot_data.end()) {
    const bool from_active = s == refs.snapshot_data.end() || (a != refs.active_data.end() && *a < *s);
    const uint64_t c = from_active ? *a++ : *s++;
    if (refs.meta.count(c)) continue;
    clusters.push_back(c);
    active.push_back(from_active);
  }
  // HashClusters reads runs of adjacent clusters in one read (a cluster read
  // alone costs a system call per 4 KiB) and hashes on every core. Past the
  // end of the file it reads zeros, as ctx.Read does.
  std::vector<HashedCluster> hashed;
  hashed.reserve(clusters.size());
  QD_RETURN_IF_ERROR(HashClusters(*ctx.file, cs, clusters, progress, [&](uint64_t c, const Digest& d) {
    hashed.push_back({c, KeyOf(d.data()), active[hashed.size()]});
  }));
  return hashed;
}

Result<HashedCompressed> HashCompressedData(Context& ctx, const References& refs, const ProgressFn& progress,
                                            CheckReport& notes) {
  HashedCompressed out;
  std::vector<uint64_t> descriptors;
  descriptors.reserve(refs.active_compressed.size() + refs.snapshot_compressed.size());
  for (const auto* v : {&refs.active_compressed, &refs.snapshot_compressed})
    for (const References::Compressed& c : *v) descriptors.push_back(c.descriptor);
  // Both lists are sorted by descriptor: where a copy is, and who reads it.
  auto find = [&](uint64_t d, bool& active) -> const References::Compressed* {
    auto by = [](const References::Compressed& a, uint64_t b) { return a.descriptor < b; };
    for (const auto* v : {&refs.active_compressed, &refs.snapshot_compressed}) {
      auto it = std::lower_bound(v->begin(), v->end(), d, by);
      if (it != v->end() && it->descriptor == d) {
        active = v == &refs.active_compressed;
        return &*it;
      }
    }
    return nullptr;
  };
  Status failed = Status::Ok();
  QD_RETURN_IF_ERROR(HashCompressedClusters(
      *ctx.file, ctx.file_size, ctx.header, descriptors, progress, [&](uint64_t d, const Result<Digest>& digest) {
        bool active = false;
        const References::Compressed* c = find(d, active);
        if (digest.ok()) {
          if (active) out.active.push_back(KeyOf(digest.value().data()));
          return;
        }
        // Only bytes that are there but wrong are the image's fault.
        if (digest.status().kind() != ErrorKind::kCorruption) {
          if (failed.ok()) failed = digest.status();
          return;
        }
        ++out.bad;
        const CompressedDescriptor where = DecodeCompressed(d, ctx.bits());
        Note(notes, FindingArea::kCompressedData, FindingKind::kError,
             fmt::format("{} compressed cluster at host offset {:#x} (guest offset {:#x}{}): {}",
                         Word(FindingKind::kError), where.offset, c ? c->guest_offset : 0,
                         active ? "" : " in a snapshot", digest.status().message()),
             where.offset / ctx.cs());
      }));
  QD_RETURN_IF_ERROR(failed);
  return out;
}

Status AuditIndex(Context& ctx, const std::vector<HashedCluster>& hashed, const HashedCompressed& compressed,
                  DedupFindings& d, CheckReport& notes) {
  const Header& h = ctx.header;
  const uint64_t cs = ctx.cs();
  d = DedupFindings{};
  d.present = h.dedup.has_value();
  d.in_sync = h.dedup_in_sync();
  d.memory_misses = h.dedup ? h.dedup->memory_misses : 0;
  d.stored_clusters = uint64_t(std::count_if(hashed.begin(), hashed.end(), [](const auto& hc) { return hc.active; }));
  d.compressed_clusters = compressed.active.size();
  // Counted on another core while this one reads and matches the index.
  std::jthread duplicates([&] { d.duplicates = CountDuplicates(hashed, compressed); });
  if (!d.in_sync) return Status::Ok();

  std::vector<StoredEntry> entries;
  if (Status broken = ReadIndex(ctx, *h.dedup, entries); !broken.ok()) {
    if (broken.kind() == ErrorKind::kIOError) return broken;
    // A newer tool's index is not ours to judge (nor an error: the writer
    // rebuilds an index it cannot read).
    if (broken.kind() == ErrorKind::kUnsupported) {
      Note(notes, FindingArea::kDedupIndex, FindingKind::kNote, "Dedup index not checked: " + broken.message());
      return Status::Ok();
    }
    IndexError(notes, "dedup index: " + broken.message());
    d.unreadable = true;
    // No entry could be read, so none is stale; every stored cluster lacks
    // its entry, and that is the count of what is wrong (once each).
    for (const HashedCluster& hc : hashed)
      if (hc.active && hc.cluster <= DedupIndex::kMaxCluster) ++d.missing;
    return Status::Ok();
  }
  d.index_loaded = true;
  d.indexed = h.dedup->index_entries;

  // The index holds every stored copy (freeing one must leave the others
  // findable), so each stored cluster needs an entry of its own.
  const uint64_t table_first = h.dedup->index_offset / cs;
  const uint64_t table_end = (h.dedup->index_offset + IndexTableBytes(h.dedup->index_buckets) + cs - 1) / cs;
  // Both in cluster order, walked side by side: hashed is, entries are made so.
  std::sort(entries.begin(), entries.end(),
            [](const StoredEntry& a, const StoredEntry& b) { return a.cluster < b.cluster; });
  std::vector<bool> has_entry(hashed.size());
  size_t at = 0;
  for (const StoredEntry& e : entries) {
    const uint64_t offset = e.cluster * cs;
    const Fingerprint key = e.key;
    const bool placed = e.cluster > 0 && (e.cluster < table_first || e.cluster >= table_end);
    while (at < hashed.size() && hashed[at].cluster < e.cluster) ++at;
    const HashedCluster* hc = placed && at < hashed.size() && hashed[at].cluster == e.cluster ? &hashed[at] : nullptr;
    if (!hc) {
      ++d.stale;
      IndexError(notes, fmt::format("dedup index entry for offset {:#x}: the cluster holds no guest data", offset));
    } else if (FingerprintOf(hc->key.data()) != key) {
      ++d.mismatched;
      IndexError(notes,
                 fmt::format("dedup index entry for cluster {}: the data there does not match the hash", offset / cs),
                 offset / cs);
    } else {
      has_entry[at] = true;
    }
  }
  for (size_t i = 0; i < hashed.size(); ++i) {
    const HashedCluster& hc = hashed[i];
    if (!hc.active || hc.cluster > DedupIndex::kMaxCluster || has_entry[i]) continue;
    ++d.missing;
    IndexError(notes, fmt::format("dedup index: no entry for the data stored in cluster {}", hc.cluster), hc.cluster);
  }
  return Status::Ok();
}

Finding Mended(Finding f) {
  if (f.area == FindingArea::kDedupIndex && f.kind == FindingKind::kError) {
    f.kind = FindingKind::kRepaired;
    f.text = std::string(Word(FindingKind::kRepaired)) + f.text.substr(std::string_view(Word(FindingKind::kError)).size());
  }
  return f;
}

Status SaveRebuiltIndex(Context& ctx, const std::vector<HashedCluster>& hashed, StoredRefcounts& stored) {
  const uint64_t cs = ctx.cs();
  DedupIndex index;
  for (const HashedCluster& hc : hashed) {  // every copy, so freeing one leaves the others findable
    if (!hc.active) continue;                // as the writer's rebuild: the active view's data
    index.Insert(FingerprintOf(hc.key.data()), hc.cluster);
  }
  QD_ASSIGN_OR_RETURN(uint64_t end, stored.EndCluster());
  const uint64_t at = std::max<uint64_t>(end, 1) * cs;
  QD_ASSIGN_OR_RETURN(DedupExtension ext, WriteIndexTable(*ctx.file, index, at));
  const uint64_t size = ext.index_offset ? at + IndexTableBytes(ext.index_buckets) : at;
  QD_RETURN_IF_ERROR(ctx.file->Truncate(std::max(size, cs)));
  QD_RETURN_IF_ERROR(ctx.RefreshFileSize().status());
  QD_RETURN_IF_ERROR(ctx.file->Sync());
  // A rebuild links nothing: the duplicates a full index missed stay.
  ext.memory_misses = ctx.header.dedup ? ctx.header.dedup->memory_misses : 0;
  ctx.header.dedup = ext;
  ctx.header.autoclear |= kAutoclearDedupInSync;
  QD_ASSIGN_OR_RETURN(std::vector<uint8_t> head, EncodeHeader(ctx.header));
  QD_RETURN_IF_ERROR(ctx.Write(0, head));
  return ctx.file->Sync();
}

}  // namespace qcow2dedup::check
