// format/refcount_block: refcounts of every width at every index of a block,
// against a reference written from qcow2.rst and QEMU's get_refcount_roN /
// set_refcount_roN, and against refcount blocks written by qemu-img.
#include "format/refcount_block.h"

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <fstream>
#include <random>

#include "support/process.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Sh;
using testing::TempDir;

namespace {

using Bytes = std::vector<uint8_t>;

uint64_t MaxFor(uint32_t order) { return order == 6 ? ~0ull : (1ull << (1u << order)) - 1; }

// Reference: entries below a byte fill it from the least significant bit;
// entries of a byte or more are big-endian.
void RefSet(Bytes& b, uint32_t order, uint64_t i, uint64_t v) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    const uint64_t bit = i * bits;
    for (uint32_t k = 0; k < bits; ++k) {
      const uint64_t at = bit + k;
      const uint8_t m = uint8_t(1u << (at % 8));
      if ((v >> k) & 1) b[at / 8] |= m;
      else b[at / 8] &= uint8_t(~m);
    }
    return;
  }
  const uint32_t bytes = bits / 8;
  for (uint32_t k = 0; k < bytes; ++k) b[i * bytes + k] = uint8_t(v >> (8 * (bytes - 1 - k)));
}

uint64_t RefGet(const Bytes& b, uint32_t order, uint64_t i) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    uint64_t v = 0;
    for (uint32_t k = 0; k < bits; ++k) {
      const uint64_t at = i * bits + k;
      v |= uint64_t((b[at / 8] >> (at % 8)) & 1) << k;
    }
    return v;
  }
  uint64_t v = 0;
  for (uint32_t k = 0; k < bits / 8; ++k) v = v << 8 | b[i * (bits / 8) + k];
  return v;
}

Bytes ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE(f.good());
  return Bytes(std::istreambuf_iterator<char>(f), {});
}

uint64_t Be(const Bytes& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | b.at(at + i);
  return v;
}

}  // namespace

TEST_CASE("the reference layout is QEMU's") {
  // Spot checks that pin the reference to qcow2.rst: bit 0 is the least
  // significant bit of byte 0; wider entries are big-endian.
  Bytes b(8, 0);
  RefSet(b, 0, 9, 1);
  CHECK(b[1] == 0x02);
  RefSet(b, 1, 1, 3);
  CHECK(b[0] == 0x0c);
  RefSet(b, 2, 5, 0xa);
  CHECK(b[2] == 0xa0);
  std::fill(b.begin(), b.end(), 0);
  RefSet(b, 4, 1, 0x1234);
  CHECK(b[2] == 0x12);
  CHECK(b[3] == 0x34);
}

TEST_CASE("GetRefcount and SetRefcount at every index of a block, for every order") {
  const size_t kBlock = 512;  // the smallest cluster: 4096 one-bit entries
  std::mt19937_64 rng(7);
  for (uint32_t order = 0; order <= 6; ++order) {
    CAPTURE(order);
    const uint64_t entries = kBlock * 8 / (1u << order);
    const uint64_t max = MaxFor(order);
    // A block full of noise: every neighbour has a value to lose.
    Bytes block(kBlock);
    for (auto& c : block) c = uint8_t(rng());
    Bytes ref = block;
    for (uint64_t i = 0; i < entries; ++i) {
      CAPTURE(i);
      REQUIRE(GetRefcount(block.data(), order, i) == RefGet(block, order, i));
      const uint64_t values[] = {0, 1, max, max - 1, rng() & max, 0};
      for (uint64_t v : values) {
        SetRefcount(block.data(), order, i, v);
        RefSet(ref, order, i, v);
        REQUIRE(GetRefcount(block.data(), order, i) == v);
        // Only entry i changed, and to QEMU's bits.
        REQUIRE(block == ref);
      }
      const uint64_t keep = rng() & max;  // leave a value behind for later indexes
      SetRefcount(block.data(), order, i, keep);
      RefSet(ref, order, i, keep);
    }
    for (uint64_t i = 0; i < entries; ++i) REQUIRE(GetRefcount(block.data(), order, i) == RefGet(ref, order, i));
  }
}

TEST_CASE("refcount maxima") {
  Bytes b(64, 0);
  for (uint32_t order = 0; order <= 6; ++order) {
    CAPTURE(order);
    std::fill(b.begin(), b.end(), 0);
    SetRefcount(b.data(), order, 3, MaxFor(order));
    CHECK(GetRefcount(b.data(), order, 3) == MaxFor(order));
    CHECK(GetRefcount(b.data(), order, 2) == 0);
    CHECK(GetRefcount(b.data(), order, 4) == 0);
  }
  // 64-bit: all 64 bits survive, big-endian.
  SetRefcount(b.data(), 6, 0, 0x0102030405060708ull);
  CHECK(b[0] == 1);
  CHECK(b[7] == 8);
  CHECK(GetRefcount(b.data(), 6, 0) == 0x0102030405060708ull);
}

// qemu-img create allocates the header, the refcount table, one refcount
// block and the L1 table, each with refcount 1. Read them back from the
// first refcount block with GetRefcount.
TEST_CASE("refcount blocks written by qemu-img create -o refcount_bits=N") {
  testing::RequireCommand("qemu-img");
  TempDir dir;
  for (uint32_t order = 0; order <= 6; ++order) {
    for (uint32_t cs : {512u, 65536u}) {
      const uint32_t bits = 1u << order;
      CAPTURE(bits);
      CAPTURE(cs);
      const std::string img = dir / "r.qcow2";
      auto r = testing::Run(fmt::format("rm -f {0} && qemu-img create -q -f qcow2 -o refcount_bits={1},cluster_size={2} {0} 64M",
                                        Sh(img), bits, cs));
      REQUIRE_MESSAGE(r.exit_code == 0, r.err);
      // Give some clusters refcounts above 1 and some data: an internal
      // snapshot shares every L2 table and data cluster.
      if (bits >= 2) {
        r = testing::Run("qemu-io -c 'write -P 0x5a 0 64k' " + Sh(img) + " && qemu-img snapshot -c s1 " + Sh(img));
        REQUIRE_MESSAGE(r.exit_code == 0, r.err);
      }
      const Bytes f = ReadAll(img);
      REQUIRE(Be(f, 96, 4) == order);
      const uint64_t rt = Be(f, 48, 8);
      const uint64_t block_off = Be(f, rt, 8) & ~0x1ffull;
      REQUIRE(block_off != 0);
      REQUIRE(block_off + cs <= f.size());
      const uint8_t* block = f.data() + block_off;
      CHECK(GetRefcount(block, order, 0) == 1);  // the header
      CHECK(GetRefcount(block, order, rt / cs) == 1);
      CHECK(GetRefcount(block, order, block_off / cs) == 1);
      // Compare all entries the block covers with qemu-img check's view:
      // qemu-img check passes, so every cluster inside the file is in use
      // (refcount >= 1) and nothing past the end is.
      const uint64_t entries = uint64_t(cs) * 8 / bits;
      const uint64_t used = (f.size() + cs - 1) / cs;
      uint64_t above_one = 0;
      for (uint64_t i = 0; i < std::min(entries, used); ++i) {
        CAPTURE(i);
        const uint64_t rc = GetRefcount(block, order, i);
        CHECK(rc >= 1);
        CHECK(rc <= MaxFor(order));
        if (rc > 1) ++above_one;
      }
      for (uint64_t i = used; i < entries; ++i) REQUIRE(GetRefcount(block, order, i) == 0);
      if (bits >= 2) CHECK(above_one > 0);  // the snapshot's shared clusters have refcount 2
    }
  }
}
