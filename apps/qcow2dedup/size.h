// Size arguments as qemu-img takes them (qemu's qemu_strtosz and
// qemu-img's cvtnum), so that a size a qemu-img script passes means the
// same bytes here, and a size qemu-img refuses is refused with its words.
#pragma once

#include <cstdint>
#include <string>

#include "qcow2dedup/status.h"

namespace qcow2dedup {

// "512", "64K", "1.5G", "0x1000": a decimal number with an optional
// fraction and an optional suffix b (bytes) or K M G T P E (powers of 1024,
// either case); a fraction needs a K..E suffix and is rounded to the
// nearest byte; hexadecimal takes neither. kInvalidArgument for text that
// is no size, kUnsupported for one past 2^64 - 1.
Result<uint64_t> ParseSize(const std::string& text);

// qemu-img's cvtnum: ParseSize, then min <= size <= max. The error's
// message is qemu-img's text for "Invalid NAME specified", its two lines
// joined into one (every error of ours is one line).
Result<uint64_t> ParseSizeInRange(const std::string& name, const std::string& text, uint64_t min,
                                  uint64_t max);

// The largest size qemu-img takes (INT64_MAX): an image, offset or length.
constexpr uint64_t kMaxSize = uint64_t(INT64_MAX);

}  // namespace qcow2dedup
