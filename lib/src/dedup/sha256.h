// SHA-256 of a cluster, through OpenSSL's EVP interface.
#pragma once

#include <array>
#include <cstdint>
#include <span>

namespace qcow2dedup {

using Digest = std::array<uint8_t, 32>;

Digest Sha256(std::span<const uint8_t> data);

// True if every byte is zero (fast: compares words).
bool IsAllZero(std::span<const uint8_t> data);

}  // namespace qcow2dedup
