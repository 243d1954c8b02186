// Decompression of compressed clusters: raw deflate (zlib without header,
// as QEMU writes it) or zstd.
#pragma once

#include <cstdint>
#include <span>

#include "format/header.h"
#include "qcow2dedup/status.h"

namespace qcow2dedup {

// Fills out (one cluster) from in; the input may carry trailing padding.
Status Decompress(CompressionType type, std::span<const uint8_t> in, std::span<uint8_t> out);

}  // namespace qcow2dedup
