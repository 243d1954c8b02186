// libFuzzer target: open an arbitrary image from memory and read its whole
// guest view. Anything but a clean error or a clean read is a bug.
#include <cstdint>
#include <vector>

#include "qcow2dedup/image.h"
#include "support/memory_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qcow2dedup;
  OpenOptions o;
  o.file = std::make_unique<testing::MemoryFile>(std::vector<uint8_t>(data, data + size));
  o.follow_backing = false;
  auto img = Image::Open("fuzz.qcow2", std::move(o));
  if (!img.ok()) return 0;
  (void)(*img)->Info();
  // Read the guest view, bounded: hostile sizes must not make us read forever.
  std::vector<uint8_t> buf(64 << 10);
  const uint64_t limit = std::min<uint64_t>((*img)->virtual_size(), 64ull << 20);
  for (uint64_t off = 0; off < limit;) {
    auto z = (*img)->ZeroRun(off);
    if (!z.ok()) break;
    if (*z > 0) {
      off += *z;
      continue;
    }
    uint64_t n = std::min<uint64_t>(buf.size(), limit - off);
    if (!(*img)->Read(off, std::span<uint8_t>(buf.data(), n)).ok()) break;
    off += n;
  }
  return 0;
}
