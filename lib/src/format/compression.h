// Compressed clusters: raw deflate (zlib without header, window bits -12,
// as QEMU writes it) or one zstd frame (QEMU's streaming compressor at its
// default level).
#pragma once

#include <cstdint>
#include <span>

#include "format/header.h"
#include "qcow2dedup/status.h"

namespace qcow2dedup {

// Fills out (one cluster) from in; the input may carry trailing padding.
Status Decompress(CompressionType type, std::span<const uint8_t> in, std::span<uint8_t> out);

// Compresses one cluster into out; returns the compressed length, or 0 when
// it does not fit in out (then the cluster is not worth compressing).
// Thread-safe: each thread keeps its own compressor state.
size_t Compress(CompressionType type, std::span<const uint8_t> in, std::span<uint8_t> out);

// Whether a cluster of cluster_size bytes that compresses to `compressed`
// bytes is stored compressed: only if it saves at least one 512-byte sector.
inline bool WorthCompressing(size_t compressed, uint64_t cluster_size) {
  return compressed != 0 && compressed + 512 <= cluster_size;
}

}  // namespace qcow2dedup
