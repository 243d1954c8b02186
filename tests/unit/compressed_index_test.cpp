// dedup/compressed_index: digest -> compressed descriptor, with the L2
// entries using each descriptor counted; a descriptor is found while used,
// forgotten when its last entry goes, and an older copy never shadows a newer.
#include "dedup/compressed_index.h"

#include <doctest/doctest.h>

using namespace qcow2dedup;

namespace {
Digest D(uint8_t v) {
  Digest d{};
  d[0] = v;
  d[31] = uint8_t(v * 3);
  return d;
}
}  // namespace

TEST_CASE("found while referenced, forgotten at the last reference") {
  CompressedIndex ix;
  const Digest a = D(1);
  const uint64_t desc = (1ull << 62) | 0x12345;
  CHECK_FALSE(ix.Find(a));
  ix.AddReference(desc, &a);
  REQUIRE(ix.Find(a));
  CHECK(*ix.Find(a) == desc);
  ix.AddReference(desc);
  CHECK(ix.References(desc) == 2);
  CHECK(ix.DropReference(desc) == 1);
  CHECK(ix.Find(a));
  CHECK(ix.DropReference(desc) == 0);
  CHECK_FALSE(ix.Find(a));
  CHECK(ix.References(desc) == 0);
  CHECK(ix.DropReference(desc) == 0);  // unknown: nothing happens
}

TEST_CASE("digests differing only past the first 64 bits are told apart") {
  CompressedIndex ix;
  Digest a = D(5), b = D(5);
  b[20] ^= 1;
  ix.AddReference(100, &a);
  CHECK(ix.Find(a));
  CHECK_FALSE(ix.Find(b));
}

TEST_CASE("a second copy of the same data: the newer is found; freeing the older keeps it") {
  CompressedIndex ix;
  const Digest a = D(2);
  ix.AddReference(100, &a);
  ix.AddReference(200, &a);
  CHECK(*ix.Find(a) == 200);
  ix.DropReference(100);
  CHECK(*ix.Find(a) == 200);
  ix.DropReference(200);
  CHECK_FALSE(ix.Find(a));
}

TEST_CASE("descriptors counted before they are hashed (a session's start)") {
  CompressedIndex ix;
  ix.AddReference(300);
  ix.AddReference(300);
  ix.AddReference(400);
  CHECK(ix.size() == 2);
  int seen = 0;
  ix.ForEachDescriptor([&](uint64_t) { ++seen; });
  CHECK(seen == 2);
  const Digest a = D(3);
  CHECK_FALSE(ix.Find(a));
  ix.SetDigest(300, a);
  CHECK(*ix.Find(a) == 300);
  ix.SetDigest(999, D(4));  // no such descriptor: ignored
  CHECK_FALSE(ix.Find(D(4)));
  ix.Clear();
  CHECK(ix.size() == 0);
  CHECK_FALSE(ix.Find(a));
}
