#include "size.h"

#include <fmt/format.h>

#include <cctype>
#include <cstdint>

namespace qcow2dedup {

Result<uint64_t> ParseSize(const std::string& text) {
  if (text.empty()) return Status::InvalidArgument("empty size");
  size_t pos = 0;
  uint64_t v = 0;
  while (pos < text.size() && isdigit((unsigned char)text[pos])) {
    uint64_t d = uint64_t(text[pos] - '0');
    if (v > (UINT64_MAX - d) / 10) return Status::InvalidArgument(fmt::format("size '{}' is too large", text));
    v = v * 10 + d;
    ++pos;
  }
  if (pos == 0) return Status::InvalidArgument(fmt::format("invalid size '{}'", text));
  int shift = 0;
  if (pos < text.size()) {
    static const std::string units = "bkmgtpe";
    std::string rest = text.substr(pos);
    if (rest.size() == 2 && (rest[1] == 'B' || rest[1] == 'b') && rest[0] != 'b' && rest[0] != 'B') rest.pop_back();
    auto u = rest.size() == 1 ? units.find(char(tolower((unsigned char)rest[0]))) : std::string::npos;
    if (u == std::string::npos) return Status::InvalidArgument(fmt::format("invalid size suffix in '{}'", text));
    shift = int(u) * 10;
  }
  if (shift && v > (UINT64_MAX >> shift)) return Status::InvalidArgument(fmt::format("size '{}' is too large", text));
  return v << shift;
}

}  // namespace qcow2dedup
