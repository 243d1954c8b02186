// Size arguments as qemu-img takes them.
#pragma once

#include <cstdint>
#include <string>

#include "qcow2dedup/status.h"

namespace qcow2dedup {

// Parses "64K", "10G", "512" (bytes; suffixes K M G T P E, powers of 1024).
Result<uint64_t> ParseSize(const std::string& text);

}  // namespace qcow2dedup
