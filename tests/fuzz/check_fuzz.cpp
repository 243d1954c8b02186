// libFuzzer target: check (and repair, in memory) an arbitrary image.
#include <cstdint>
#include <vector>

#include "qcow2dedup/check.h"
#include "support/memory_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qcow2dedup;
  for (RepairMode mode : {RepairMode::kNone, RepairMode::kAll}) {
    CheckOptions o;
    o.repair = mode;
    o.file = std::make_unique<testing::MemoryFile>(std::vector<uint8_t>(data, data + size));
    (void)CheckImage("fuzz.qcow2", std::move(o));
  }
  return 0;
}
