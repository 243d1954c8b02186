#include "size.h"

#include <fmt/format.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace qcow2dedup {
namespace {

// The multiplier of a suffix character, or 0 for none.
uint64_t SuffixMultiplier(char c) {
  switch (c) {
    case 'b': case 'B': return 1;
    case 'k': case 'K': return uint64_t(1) << 10;
    case 'm': case 'M': return uint64_t(1) << 20;
    case 'g': case 'G': return uint64_t(1) << 30;
    case 't': case 'T': return uint64_t(1) << 40;
    case 'p': case 'P': return uint64_t(1) << 50;
    case 'e': case 'E': return uint64_t(1) << 60;
    default: return 0;
  }
}

Status NotASize(const std::string& text) { return Status::InvalidArgument(fmt::format("invalid size '{}'", text)); }

}  // namespace

// The steps of qemu's do_strtosz (util/cutils.c, QEMU 7.2), in its order,
// so that the odd cases ("1.k", " 1k", "0x10") come out as qemu-img's.
Result<uint64_t> ParseSize(const std::string& text) {
  const char* s = text.c_str();
  char* end = nullptr;
  errno = 0;
  uint64_t value = std::strtoull(s, &end, 10);
  if (end == s) return NotASize(text);
  if (errno == ERANGE) return Status::Unsupported(fmt::format("size '{}' is too large", text));
  if (std::memchr(s, '-', size_t(end - s))) return NotASize(text);  // strtoull takes "-1" as 2^64 - 1
  unsigned __int128 fraction = 0;  // 64.64 fixed point, as qemu keeps it
  bool hex = false;
  if (value == 0 && (*end == 'x' || *end == 'X')) {
    errno = 0;
    value = std::strtoull(s, &end, 16);
    if (errno == ERANGE) return Status::Unsupported(fmt::format("size '{}' is too large", text));
    if (*end == '.') return NotASize(text);
    hex = true;
  } else if (*end == '.') {
    const char* f = end;
    double d = std::strtod(f, &end);
    if (end == f) {
      ++end;  // "1.k": a point without digits is a zero fraction
    } else if (std::memchr(f, 'e', size_t(end - f)) || std::memchr(f, 'E', size_t(end - f)) || !std::isfinite(d)) {
      return NotASize(text);
    } else if (d < 1.0) {  // ".99999999999999999999" rounds to 1.0: qemu's conversion then yields 0
      fraction = (unsigned __int128)(uint64_t)std::ldexp(d, 64);
    }
  }
  uint64_t mul = SuffixMultiplier(*end);
  if (mul != 0) {
    // qemu-img 7.2 still takes "0x10k", and warns (a printing parser, but
    // only the CLI parses sizes).
    if (hex) fmt::print(stderr, "qcow2dedup: warning: Using a multiplier suffix on hex numbers is deprecated: {}\n", text);
    ++end;
  } else {
    mul = 1;
  }
  if (*end != '\0') return NotASize(text);
  if (mul == 1) {
    if (fraction != 0) return NotASize(text);  // a fraction of a byte
    return value;
  }
  // 64.64 x 64.0, rounding half a byte up.
  unsigned __int128 whole = (unsigned __int128)value * mul;
  const unsigned __int128 part = fraction * mul;
  whole += (part >> 64) + ((part >> 63) & 1);
  if (whole >> 64) return Status::Unsupported(fmt::format("size '{}' is too large", text));
  return uint64_t(whole);
}

Result<uint64_t> ParseSizeInRange(const std::string& name, const std::string& text, uint64_t min, uint64_t max) {
  auto size = ParseSize(text);
  if (!size.ok() && size.status().kind() == ErrorKind::kInvalidArgument)
    return Status::InvalidArgument(
        fmt::format("Invalid {} specified. You may use k, M, G, T, P or E suffixes for "
                    "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
                    name));
  if (!size.ok() || *size < min || *size > max)
    return Status::InvalidArgument(fmt::format("Invalid {} specified. Must be between {} and {}.", name, min, max));
  return *size;
}

}  // namespace qcow2dedup
