// dedup-stats --simulate: what optimal dedup would store at several cluster
// sizes, in one sequential pass over a device (stats/cluster_scan.h).
#include <algorithm>
#include <map>

#include "dedup/hasher.h"
#include "format/compression.h"
#include "qcow2dedup/stats.h"
#include "stats/cluster_scan.h"
#include "stats/size_estimate.h"

namespace qcow2dedup {
namespace {

// Less compressing than this is not worth a thread.
constexpr uint64_t kMinBytesPerThread = 256u << 10;

struct Compressed {
  uint64_t compressible = 0, bytes = 0;
};

// Compresses the chunk's new unique clusters (convert -c compresses only
// those), on every core.
void CompressFresh(const ScanChunk& c, const SizeScan& s, CompressionType type, Compressed& out) {
  std::vector<uint32_t> sizes(s.fresh.size());
  ParallelFor(s.fresh.size(), std::max<uint64_t>(1, kMinBytesPerThread / s.cs), [&](size_t i) {
    thread_local std::vector<uint8_t> buf;
    buf.resize(s.cs);
    const size_t n = Compress(type, std::span<const uint8_t>(&c.data[s.fresh[i] * s.cs], s.cs),
                              std::span<uint8_t>(buf).first(s.cs - 512));
    sizes[i] = WorthCompressing(n, s.cs) ? uint32_t(n) : 0;
  });
  for (uint32_t n : sizes)
    if (n) {
      ++out.compressible;
      out.bytes += n;
    }
}

}  // namespace

Result<std::vector<Simulation>> SimulateDedup(BlockDevice& device, const std::vector<uint64_t>& cluster_sizes,
                                              ProgressFn progress, std::optional<Compression> compression) {
  QD_RETURN_IF_ERROR(ValidateClusterSizes(cluster_sizes));
  std::vector<SizeScan> scans = MakeSizeScans(cluster_sizes);
  std::vector<Compressed> compressed(scans.size());
  const CompressionType type =
      compression == Compression::kZstd ? CompressionType::kZstd : CompressionType::kDeflate;
  QD_RETURN_IF_ERROR(ScanDevice(
      device, scans,
      [&](const ScanChunk& c) {
        for (size_t k = 0; k < scans.size(); ++k) {
          CountChunk(c, scans[k]);
          if (compression) CompressFresh(c, scans[k], type, compressed[k]);
        }
        return Status::Ok();
      },
      progress));

  const uint64_t size = device.virtual_size();
  std::map<uint64_t, size_t> by_size;
  for (size_t k = 0; k < scans.size(); ++k) by_size[scans[k].cs] = k;
  std::vector<Simulation> out;
  for (uint64_t cs : cluster_sizes) {
    const size_t k = by_size[cs];
    Simulation sim = ToSimulation(scans[k], size);
    if (compression) {
      sim.compressible = compressed[k].compressible;
      sim.compressed_bytes = compressed[k].bytes;
      const uint64_t stored = sim.unique - sim.compressible + (sim.compressed_bytes + cs - 1) / cs;
      sim.estimated_compressed_image_size = EstimateImageSize(size, cs, scans[k].l2_tables, stored);
    }
    out.push_back(sim);
  }
  return out;
}

}  // namespace qcow2dedup
