// dedup-stats --simulate over several images: each alone, all together in
// one dedup image, and each as an overlay on a base (qcow2dedup/stats.h).
// The images are scanned one after the other, so that only the set of all
// their distinct clusters grows with the fleet; an image's own sets go
// when it is done.
#include <algorithm>
#include <cstring>
#include <map>

#include "qcow2dedup/stats.h"
#include "stats/cluster_scan.h"
#include "stats/size_estimate.h"

namespace qcow2dedup {
namespace {

// One cluster size's overlay of one image.
struct OverlayScan {
  uint64_t differing = 0;
  uint64_t l2_tables = 0, last_table = UINT64_MAX;
  DigestSet unique;
};

// The base's bytes under the chunk, zeros past the base's end (a backing
// file shorter than its overlay reads as zeros there).
Status ReadBase(BlockDevice& base, const ScanChunk& c, std::vector<uint8_t>& out) {
  out.assign(c.data.size(), 0);
  const uint64_t size = base.virtual_size();
  if (c.offset >= size) return Status::Ok();
  return base.Read(c.offset, std::span<uint8_t>(out.data(), std::min(c.length, size - c.offset)));
}

// Which of the chunk's smallest clusters differ from the base's. Equal
// bytes are what matters (an image's zero cluster over base data still
// differs); zero-padding past either end is equal on both sides.
void DifferingLeaves(const ScanChunk& c, const std::vector<uint8_t>& base, uint64_t cs,
                     std::vector<uint8_t>& differs) {
  const size_t n = c.data.size() / cs;
  differs.resize(n);
  for (size_t i = 0; i < n; ++i) differs[i] = std::memcmp(&c.data[i * cs], &base[i * cs], cs) != 0;
}

// Counts the chunk's clusters of s's size that an overlay must hold:
// non-zero, and some smallest cluster of them differs from the base.
void CountOverlay(const ScanChunk& c, const SizeScan& s, uint64_t leaf_cs, const std::vector<uint8_t>& differs,
                  OverlayScan& o) {
  const uint64_t r = s.cs / leaf_cs, first = c.offset / s.cs, per_table = s.cs / 8;
  for (size_t j = 0; j < s.nonzero_flags.size(); ++j) {
    if (!s.nonzero_flags[j]) continue;
    const auto from = differs.begin() + j * r;
    if (std::find(from, from + r, 1) == from + r) continue;
    ++o.differing;
    const uint64_t table = (first + j) / per_table;
    if (table != o.last_table) {
      ++o.l2_tables;
      o.last_table = table;
    }
    o.unique.Insert(s.digests[j].data());
  }
}

}  // namespace

Result<std::vector<FleetSimulation>> SimulateFleet(const std::vector<FleetImage>& images,
                                                   const std::optional<FleetImage>& base_image,
                                                   const std::vector<uint64_t>& cluster_sizes,
                                                   ProgressFn progress) {
  QD_RETURN_IF_ERROR(ValidateClusterSizes(cluster_sizes));
  if (images.empty()) return Status::InvalidArgument("no images to simulate");
  BlockDevice* base = base_image ? base_image->device : nullptr;
  uint64_t total = base ? base->virtual_size() : 0, before = 0;
  for (const FleetImage& img : images) total += img.device->virtual_size();
  const ProgressFn part = [&](uint64_t done, uint64_t) {
    if (progress) progress(before + done, total);
  };

  // Per distinct size, smallest first, as the scans.
  std::vector<SizeScan> sizes = MakeSizeScans(cluster_sizes);
  std::vector<FleetSimulation> fleet(sizes.size());
  for (size_t k = 0; k < sizes.size(); ++k) fleet[k].cluster_size = sizes[k].cs;

  if (base) {
    auto sims = SimulateDedup(*base, cluster_sizes, part);
    if (!sims.ok()) return sims.status().Prefixed(base_image->name);
    for (FleetSimulation& f : fleet)
      f.base = *std::find_if(sims->begin(), sims->end(),
                             [&](const Simulation& s) { return s.cluster_size == f.cluster_size; });
    before += base->virtual_size();
  }

  std::vector<DigestSet> together(sizes.size());
  std::vector<uint8_t> base_bytes, differs;
  for (const FleetImage& image : images) {
    BlockDevice* img = image.device;
    std::vector<SizeScan> scans = MakeSizeScans(cluster_sizes);
    std::vector<OverlayScan> overlays(base ? scans.size() : 0);
    const FleetImage* failed = &image;  // whose read an error comes from
    Status scanned = ScanDevice(
        *img, scans,
        [&](const ScanChunk& c) -> Status {
          for (size_t k = 0; k < scans.size(); ++k) {
            SizeScan& s = scans[k];
            CountChunk(c, s);
            for (size_t j = 0; j < s.nonzero_flags.size(); ++j)
              if (s.nonzero_flags[j]) together[k].Insert(s.digests[j].data());
          }
          if (!base) return Status::Ok();
          Status st = ReadBase(*base, c, base_bytes);
          if (!st.ok()) {
            failed = &*base_image;
            return st;
          }
          DifferingLeaves(c, base_bytes, scans[0].cs, differs);
          for (size_t k = 0; k < scans.size(); ++k) CountOverlay(c, scans[k], scans[0].cs, differs, overlays[k]);
          return Status::Ok();
        },
        part);
    if (!scanned.ok()) return scanned.Prefixed(failed->name);
    const uint64_t size = img->virtual_size();
    for (size_t k = 0; k < scans.size(); ++k) {
      fleet[k].alone.push_back(ToSimulation(scans[k], size));
      fleet[k].alone_unique += fleet[k].alone.back().unique;
      fleet[k].together_nonzero += scans[k].nonzero;
      if (!base) continue;
      const OverlayScan& o = overlays[k];
      const uint64_t unique = o.unique.size();
      fleet[k].overlays.push_back(
          {o.differing, unique, EstimateImageSize(size, scans[k].cs, o.l2_tables, unique)});
      fleet[k].overlays_unique += unique;
    }
    before += size;
  }
  for (size_t k = 0; k < sizes.size(); ++k) {
    FleetSimulation& f = fleet[k];
    f.together_unique = together[k].size();
    f.together_ratio = f.together_unique ? double(f.together_nonzero) / double(f.together_unique) : 1.0;
  }

  std::vector<FleetSimulation> out;
  for (uint64_t cs : cluster_sizes)
    out.push_back(*std::find_if(fleet.begin(), fleet.end(),
                                [cs](const FleetSimulation& f) { return f.cluster_size == cs; }));
  return out;
}

}  // namespace qcow2dedup
