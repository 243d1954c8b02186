// image/compressed_packer: fragments packed byte after byte as QEMU's
// qcow2_alloc_bytes packs them, one reference on every cluster a fragment
// touches (qemu-img check's count), no cluster past the share limit, and a
// freed cluster never packed into again.
#include "image/compressed_packer.h"

#include <doctest/doctest.h>

#include <map>

using namespace qcow2dedup;

namespace {

constexpr uint64_t kCs = 4096;

// A toy allocator: clusters handed out in order from 10, or from a list.
struct Model {
  std::map<uint64_t, uint64_t> refs;  // cluster -> refcount
  uint64_t next = 10;
  std::vector<uint64_t> hand_out;  // taken first, if any
  uint64_t limit = 1000;
  CompressedPacker::Hooks Hooks() {
    return {
        [this]() -> Result<uint64_t> {
          uint64_t c = next++;
          if (!hand_out.empty()) {
            c = hand_out.front();
            hand_out.erase(hand_out.begin());
          }
          refs[c] = 1;
          return c * kCs;
        },
        [this](uint64_t c) -> Result<bool> { return refs[c] > 0 && refs[c] + 1 <= limit; },
        [this](uint64_t c) {
          ++refs[c];
          return Status::Ok();
        },
    };
  }
};

// The clusters [at, at + n) touches, as qemu-img check counts a descriptor.
std::vector<uint64_t> Touched(uint64_t at, uint64_t n) {
  std::vector<uint64_t> out;
  const uint64_t first = at / kCs, last = ((at & ~511ull) + ((at & 511) + n + 511) / 512 * 512 - 1) / kCs;
  for (uint64_t c = first; c <= last; ++c) out.push_back(c);
  return out;
}

}  // namespace

TEST_CASE("fragments follow each other byte for byte, straddling into the adjacent cluster") {
  Model m;
  CompressedPacker p(kCs);
  auto h = m.Hooks();
  std::map<uint64_t, uint64_t> expect;
  uint64_t want = 10 * kCs;
  for (uint64_t n : {1000u, 1000u, 1000u, 1500u, 3000u, 700u, 2048u, 2048u}) {
    auto at = p.Place(n, h);
    REQUIRE(at.ok());
    CHECK(*at == want);  // no gap, whatever the size
    for (uint64_t c : Touched(*at, n)) ++expect[c];
    want += n;
  }
  CHECK(m.refs == expect);
  // 1000+1000+1000+1500 crosses into cluster 11: cluster 10 has 4 fragments.
  CHECK(m.refs[10] == 4);
}

TEST_CASE("a fragment that does not fit and whose next cluster is not adjacent starts a fresh one") {
  Model m;
  m.hand_out = {10, 20};
  CompressedPacker p(kCs);
  auto h = m.Hooks();
  REQUIRE(*p.Place(3000, h) == 10 * kCs);
  auto at = p.Place(2000, h);  // 1096 bytes left in 10, and 20 is not 11
  REQUIRE(at.ok());
  CHECK(*at == 20 * kCs);
  CHECK(m.refs[10] == 1);
  CHECK(m.refs[20] == 1);
  // The next one packs behind it in 20.
  CHECK(*p.Place(100, h) == 20 * kCs + 2000);
  CHECK(m.refs[20] == 2);
}

TEST_CASE("a fragment ending exactly at a cluster's end leaves nothing to pack into") {
  Model m;
  CompressedPacker p(kCs);
  auto h = m.Hooks();
  REQUIRE(*p.Place(2048, h) == 10 * kCs);
  REQUIRE(*p.Place(2048, h) == 10 * kCs + 2048);
  CHECK(*p.Place(10, h) == 11 * kCs);
  CHECK(m.refs[10] == 2);
  CHECK(m.refs[11] == 1);
}

TEST_CASE("no cluster passes the share limit") {
  Model m;
  m.limit = 3;
  CompressedPacker p(kCs);
  auto h = m.Hooks();
  for (int i = 0; i < 12; ++i) REQUIRE(p.Place(100, h).ok());
  for (auto& [c, r] : m.refs) CHECK(r <= 3);
  CHECK(m.refs.size() == 4);
}

TEST_CASE("a cluster that lost its last reference is not packed into again") {
  Model m;
  CompressedPacker p(kCs);
  auto h = m.Hooks();
  REQUIRE(*p.Place(100, h) == 10 * kCs);
  // Its fragment freed, the cluster reused for something else (refcount 1
  // again): the packer must not write behind that.
  m.refs[10] = 1;
  p.Forget(10);
  CHECK(*p.Place(100, h) == 11 * kCs);
  // Forgetting another cluster changes nothing.
  p.Forget(99);
  CHECK(*p.Place(100, h) == 11 * kCs + 100);
}

TEST_CASE("an allocation failure leaves the packer usable") {
  Model m;
  CompressedPacker p(kCs);
  auto h = m.Hooks();
  h.allocate = []() -> Result<uint64_t> { return Status::NoSpace("full"); };
  CHECK_FALSE(p.Place(100, h).ok());
  auto ok = m.Hooks();
  CHECK(*p.Place(100, ok) == 10 * kCs);
}
