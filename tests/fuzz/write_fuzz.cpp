// libFuzzer target: open an arbitrary image from memory for writing, write
// into it through the dedup write path (new data across a cluster boundary,
// a copy of data it already holds, zeros), close it, and read the result
// back from the closed bytes. A refused open or a failed write is fine; a
// crash, a sanitizer report, or a closed image that does not open again or
// reads other data than was written is a bug.
//
// The input's last 8 bytes choose where the writes go (they are part of
// the image too, as libFuzzer mutates them anyway).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qcow2dedup/image.h"
#include "support/memory_file.h"

namespace {

using namespace qcow2dedup;

[[noreturn]] void Fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "write_fuzz: %s: %s\n", what, detail.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t knobs = 0;
  std::memcpy(&knobs, data + size - 8, 8);

  auto owned = std::make_unique<testing::MemoryFile>(std::vector<uint8_t>(data, data + size));
  testing::MemoryFile* file = owned.get();
  OpenOptions o;
  o.writable = true;
  o.follow_backing = false;
  o.file = std::move(owned);
  auto img = Image::Open("fuzz.qcow2", std::move(o));
  if (!img.ok()) return 0;
  Image& image = **img;
  const uint64_t cs = image.cluster_size();
  // Writes stay in a window at the start of the disk, shadowed here.
  const uint64_t window = std::min<uint64_t>(image.virtual_size(), 4u << 20);
  if (window == 0 || cs == 0) return 0;
  std::vector<uint8_t> shadow(window), known(window);
  auto write = [&](uint64_t off, const std::vector<uint8_t>& bytes) {
    if (off >= window) return true;
    const uint64_t n = std::min<uint64_t>(bytes.size(), window - off);
    if (!image.Write(off, std::span<const uint8_t>(bytes.data(), n)).ok()) return false;
    std::memcpy(&shadow[off], bytes.data(), n);
    std::memset(&known[off], 1, n);
    return true;
  };

  // 1. New data across a cluster boundary.
  const uint64_t a = (knobs & 0xffff) * 512 % window;
  std::vector<uint8_t> fresh(cs + 1000);
  for (size_t i = 0; i < fresh.size(); ++i) fresh[i] = uint8_t(0x5a ^ (i * 131) ^ (knobs >> 56));
  if (!write(a, fresh)) return 0;
  // 2. A copy of a cluster the image holds now: a dedup hit or a new cluster.
  const uint64_t from = ((knobs >> 16) & 0xff) * cs, to = ((knobs >> 24) & 0xff) * cs;
  if (from + cs <= image.virtual_size()) {
    std::vector<uint8_t> copy(cs);
    if (!image.Read(from, copy).ok()) return 0;
    if (!write(to, copy)) return 0;
    // And again elsewhere, so the same data is shared at least twice.
    if (!write(((knobs >> 32) & 0xff) * cs, copy)) return 0;
  }
  // 3. Zeros over part of a cluster.
  if (!write(((knobs >> 40) & 0xffff) * 512 % window, std::vector<uint8_t>(cs / 2 + 1, 0))) return 0;
  if (!image.Close().ok()) return 0;

  // The closed image must open again and read what was written.
  OpenOptions ro;
  ro.follow_backing = false;
  ro.file = std::make_unique<testing::MemoryFile>(file->bytes());
  auto again = Image::Open("fuzz.qcow2", std::move(ro));
  if (!again.ok()) Fail("the image we closed does not open again", again.status().message());
  // Only the ranges written: elsewhere the input may hold damage we never touched.
  for (uint64_t i = 0; i < window;) {
    if (!known[i]) {
      ++i;
      continue;
    }
    uint64_t end = i;
    while (end < window && known[end]) ++end;
    std::vector<uint8_t> now(end - i);
    if (auto s = (*again)->Read(i, now); !s.ok())
      Fail("what we wrote cannot be read back", s.message() + " (guest offset " + std::to_string(i) + ")");
    if (std::memcmp(now.data(), &shadow[i], now.size()) != 0)
      Fail("the image we closed reads other data than was written", "guest offsets " + std::to_string(i) + "-" +
                                                                         std::to_string(end));
    i = end;
  }
  return 0;
}
