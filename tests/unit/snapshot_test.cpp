// The snapshot table reader (format/snapshot.cpp): what it accepts and
// refuses of a snapshot's L1 table, against QEMU's rules.
#include "format/snapshot.h"

#include <doctest/doctest.h>

#include "format/endian.h"
#include "support/memory_file.h"

using namespace qcow2dedup;

namespace {

constexpr uint64_t kCs = 512;

// A file of 8 clusters whose cluster 4 holds one snapshot entry.
Result<SnapshotTable> ReadOne(uint64_t l1_offset, uint32_t l1_size) {
  std::vector<uint8_t> bytes(8 * kCs);
  uint8_t* e = &bytes[4 * kCs];
  auto be32_at = [](uint8_t* p, uint32_t v) { *reinterpret_cast<be32*>(p) = v; };
  auto be16_at = [](uint8_t* p, uint16_t v) { *reinterpret_cast<be16*>(p) = v; };
  StoreBe64(e, l1_offset);
  be32_at(e + 8, l1_size);
  be16_at(e + 12, 1);  // id "1"
  be16_at(e + 14, 1);  // name "s"
  be32_at(e + 36, 16);  // extra data: vm state size, disk size
  StoreBe64(e + 48, 64 << 10);
  e[56] = '1';
  e[57] = 's';
  Header h;
  h.cluster_bits = 9;
  h.virtual_size = 64 << 10;
  h.nb_snapshots = 1;
  h.snapshots_offset = 4 * kCs;
  testing::MemoryFile f(bytes);
  return ReadSnapshotTable(f, h, bytes.size());
}

}  // namespace

TEST_CASE("a snapshot L1 table inside the file, cluster aligned, is read") {
  auto t = ReadOne(2 * kCs, 1);
  REQUIRE_MESSAGE(t.ok(), t.status().message());
  REQUIRE(t->snapshots.size() == 1);
  CHECK(t->snapshots[0].l1_offset == 2 * kCs);
  CHECK(t->snapshots[0].info.name == "s");
}

// Found by check_fuzz: `check -r all` (and qemu-img check) called such an
// image clean and QEMU opens it, but Image::Open refused it ("snapshot ''
// has its L1 table at a bad offset 0x0").
TEST_CASE("an empty snapshot L1 table at offset 0 is accepted, as QEMU does") {
  auto t = ReadOne(0, 0);
  REQUIRE_MESSAGE(t.ok(), t.status().message());
  CHECK(t->snapshots[0].l1_size == 0);
}

TEST_CASE("a snapshot L1 table that is misaligned, in the header or past the end is refused") {
  CHECK(ReadOne(0, 1).status().kind() == ErrorKind::kCorruption);
  CHECK(ReadOne(kCs + 8, 0).status().kind() == ErrorKind::kCorruption);
  CHECK(ReadOne(kCs + 8, 1).status().kind() == ErrorKind::kCorruption);
  CHECK(ReadOne(8 * kCs, 1).status().kind() == ErrorKind::kCorruption);
  CHECK(ReadOne(7 * kCs, 65).status().kind() == ErrorKind::kCorruption);
}
