// dedup-stats: what deduplication saved in an image, from its L2 tables.
// Two walks over the tables: the first counts references per host cluster,
// the second (only for the most shared clusters) collects guest offsets.
#include <fmt/format.h>

#include <map>
#include <queue>
#include <set>
#include <unordered_map>

#include "dedup/index_table.h"
#include "qcow2dedup/stats.h"
#include "stats/histogram.h"
#include "stats/host_references.h"
#include "stats/l2_walk.h"
#include "stats/reclaimable.h"

namespace qcow2dedup {
namespace {

constexpr size_t kGuestOffsetsPerCluster = 8;

// Where data is kept: a host cluster, or compressed bytes.
struct StoredKey {
  uint64_t host;
  bool compressed;
  auto operator<=>(const StoredKey&) const = default;
};

struct Candidate {
  StoredKey key;
  uint64_t refs;
};

// Most shared first; ties by offset, so that the answer never varies.
bool Before(const Candidate& a, const Candidate& b) {
  if (a.refs != b.refs) return a.refs > b.refs;
  return a.key < b.key;
}

// The top_count best candidates, seen one at a time.
class TopList {
 public:
  explicit TopList(size_t n) : n_(n) {}
  void Offer(StoredKey key, uint64_t refs) {
    if (n_ == 0 || refs < 2) return;
    heap_.push({key, refs});
    if (heap_.size() > n_) heap_.pop();  // the worst of them
  }
  std::vector<Candidate> Sorted() {
    std::vector<Candidate> v;
    for (; !heap_.empty(); heap_.pop()) v.push_back(heap_.top());
    std::sort(v.begin(), v.end(), Before);
    return v;
  }

 private:
  size_t n_;
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(&Before)> heap_{Before};
};

Status MeasureMetadata(ImageState& s, DedupStats::Metadata& m) {
  const Header& h = s.header;
  const uint64_t cs = s.cs();
  m.l1 = (uint64_t(h.l1_size) * 8 + cs - 1) / cs * cs;
  std::set<uint64_t> tables;
  for (uint64_t e : s.map->l1())
    if (L1Offset(e)) tables.insert(L1Offset(e));
  m.l2 = tables.size() * cs;
  std::vector<uint8_t> reftable(uint64_t(h.reftable_clusters) * cs);
  QD_RETURN_IF_ERROR(s.file->ReadAt(h.reftable_offset, reftable));
  uint64_t blocks = 0;
  for (size_t i = 0; i + 8 <= reftable.size(); i += 8)
    if (RefTableOffset(LoadBe64(&reftable[i]))) ++blocks;
  m.refcount = (h.reftable_clusters + blocks) * cs;
  // An index out of sync is dead bytes the next writer replaces (QEMU may
  // already have put data there): it is no part of the image's metadata.
  m.index = h.dedup_in_sync() && h.dedup->index_offset ? IndexTableBytes(h.dedup->index_buckets) : 0;
  return Status::Ok();
}

// Guest offsets of the top clusters, the lowest first.
Status CollectGuestOffsets(ImageState& s, uint64_t guest_clusters, std::vector<SharedCluster>& top,
                           const std::vector<Candidate>& picked) {
  std::map<StoredKey, size_t> where;
  for (size_t i = 0; i < picked.size(); ++i) where[picked[i].key] = i;
  size_t unfinished = picked.size();
  std::vector<GuestCluster> table;
  const uint64_t tables = (guest_clusters + s.header.l2_entries() - 1) / s.header.l2_entries();
  for (uint64_t i = 0; i < tables && unfinished > 0; ++i) {
    QD_RETURN_IF_ERROR(DecodeL2Table(s, i, guest_clusters, table));
    for (const GuestCluster& g : table) {
      if (g.kind != ClusterKind::kData && g.kind != ClusterKind::kCompressed) continue;
      auto it = where.find({g.host, g.kind == ClusterKind::kCompressed});
      if (it == where.end()) continue;
      auto& offsets = top[it->second].guest_offsets;
      if (offsets.size() >= kGuestOffsetsPerCluster) continue;
      offsets.push_back(g.index * s.cs());
      if (offsets.size() == kGuestOffsetsPerCluster) --unfinished;
    }
  }
  return Status::Ok();
}

}  // namespace

Result<DedupStats> ComputeDedupStats(const std::string& path, size_t top_count, bool force_share,
                                     const ProgressFn& progress) {
  OpenOptions o;
  o.writable = false;
  o.force_share = force_share;
  QD_ASSIGN_OR_RETURN(auto image, Image::Open(path, std::move(o)));
  ImageState& s = StateOf(*image);
  const Header& h = s.header;
  const uint64_t cs = s.cs();

  DedupStats st;
  st.filename = path;
  st.virtual_size = h.virtual_size;
  st.cluster_size = cs;
  st.guest_clusters = (h.virtual_size + cs - 1) / cs;
  // Unallocated clusters from here on read as zero even with a backing file.
  const uint64_t backing_end =
      s.backing ? std::min(st.guest_clusters, (s.backing->virtual_size() + cs - 1) / cs) : 0;

  HostReferences refs;
  std::map<uint64_t, uint64_t> compressed;  // offset -> references
  std::vector<uint64_t> compressed_hosts;   // host clusters compressed bytes touch (repeats)
  uint64_t zero_flagged = 0, mapped_past_backing = 0;
  std::vector<GuestCluster> table;
  const uint64_t tables = (st.guest_clusters + h.l2_entries() - 1) / h.l2_entries();
  for (uint64_t i = 0; i < tables; ++i) {
    QD_RETURN_IF_ERROR(DecodeL2Table(s, i, st.guest_clusters, table));
    for (const GuestCluster& g : table) {
      switch (g.kind) {
        case ClusterKind::kUnallocated: continue;
        case ClusterKind::kZero: ++zero_flagged; break;
        case ClusterKind::kData: ++st.data_clusters; refs.Add(g.host / cs); break;
        case ClusterKind::kCompressed: {
          ++st.data_clusters;
          if (++compressed[g.host] > 1) break;
          const CompressedDescriptor d = DecodeCompressed(g.entry, h.cluster_bits);
          for (uint64_t c = FirstHostCluster(d, h.cluster_bits); c <= LastHostCluster(d, h.cluster_bits); ++c)
            compressed_hosts.push_back(c);
          break;
        }
      }
      if (g.index >= backing_end) ++mapped_past_backing;
    }
  }
  const uint64_t unallocated = st.guest_clusters - st.data_clusters - zero_flagged;
  const uint64_t unallocated_past_backing = st.guest_clusters - backing_end - mapped_past_backing;
  st.zero_clusters = zero_flagged + unallocated_past_backing;
  st.backing_clusters = unallocated - unallocated_past_backing;

  RefcountHistogram histogram;
  TopList top(top_count);
  auto tally = [&](StoredKey key, uint64_t n) {
    ++st.stored_clusters;
    histogram.Add(n);
    top.Offer(key, n);
  };
  refs.ForEach([&](uint64_t cluster, uint64_t n) { tally({cluster * cs, false}, n); });
  for (const auto& [offset, n] : compressed) tally({offset, true}, n);
  st.histogram = histogram.Take();

  if (st.stored_clusters) st.dedup_ratio = double(st.data_clusters) / double(st.stored_clusters);
  std::sort(compressed_hosts.begin(), compressed_hosts.end());
  const uint64_t compressed_host_clusters =
      std::unique(compressed_hosts.begin(), compressed_hosts.end()) - compressed_hosts.begin();
  st.compressed_clusters = compressed.size();
  st.stored_bytes = (st.stored_clusters - st.compressed_clusters + compressed_host_clusters) * cs;
  if (st.stored_bytes) {
    st.compress_ratio = double(st.stored_clusters * cs) / double(st.stored_bytes);
    st.total_ratio = double(st.data_clusters * cs) / double(st.stored_bytes);
  }
  st.saved_bytes = (st.data_clusters - st.stored_clusters) * cs;
  if (st.data_clusters) st.saving_percent = 100.0 * double(st.data_clusters - st.stored_clusters) / double(st.data_clusters);

  std::vector<Candidate> picked = top.Sorted();
  for (const Candidate& c : picked) st.top.push_back({c.key.host, c.refs, {}});
  QD_RETURN_IF_ERROR(CollectGuestOffsets(s, st.guest_clusters, st.top, picked));
  QD_RETURN_IF_ERROR(MeasureMetadata(s, st.metadata));
  QD_ASSIGN_OR_RETURN(st.reclaimable_clusters, CountReclaimable(s, refs, progress));
  st.memory_misses = h.dedup ? h.dedup->memory_misses : 0;
  return st;
}

}  // namespace qcow2dedup
