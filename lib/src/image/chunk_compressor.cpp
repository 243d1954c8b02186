#include "image/chunk_compressor.h"

#include <cstring>

#include "dedup/hasher.h"
#include "format/compression.h"
#include "image/image_state.h"

namespace qcow2dedup {

void ChunkCompressor::Run(std::span<ClusterWrite> writes, std::vector<uint8_t>& out) {
  std::vector<size_t> mine;
  {
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < writes.size(); ++i) {
      if (writes[i].zero) continue;
      writes[i].compress = true;
      writes[i].compressed = {};
      uint64_t key;
      std::memcpy(&key, writes[i].digest.data(), sizeof key);
      if (seen_.insert(key).second) mine.push_back(i);
    }
  }
  // Room for each at its own offset: spans into out must not move.
  out.resize(std::max<size_t>(out.size(), mine.size() * cs_));
  // On every core within the chunk too: the pipeline keeps only a few
  // chunks in flight, and compressing is what takes the time.
  ParallelFor(mine.size(), std::max<uint64_t>(1, (256u << 10) / cs_), [&](size_t k) {
    ClusterWrite& w = writes[mine[k]];
    std::span<uint8_t> slot(out.data() + k * cs_, cs_ - 512);
    const size_t n = Compress(type_, w.data, slot);
    if (WorthCompressing(n, cs_)) {
      w.compressed = slot.first(n);
    } else {
      w.compress = false;  // stored as it is
    }
  });
}

std::unique_ptr<ChunkCompressor> MakeChunkCompressor(Image& dst) {
  const Header& h = StateOf(dst).header;
  return std::make_unique<ChunkCompressor>(h.compression, h.cluster_size());
}

}  // namespace qcow2dedup
