// format/entries: the bit layout of L1, L2 and refcount-table entries and
// of compressed-cluster descriptors, against qcow2.rst and against the
// descriptors in images written by `qemu-img convert -c`.
#include "format/entries.h"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <zlib.h>
#include <zstd.h>

#include <fstream>
#include <random>
#include <span>

#include "support/process.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Sh;
using testing::TempDir;

namespace {

using Bytes = std::vector<uint8_t>;

uint64_t Bits(int lo, int hi) {  // bits lo..hi inclusive
  uint64_t m = 0;
  for (int b = lo; b <= hi; ++b) m |= 1ull << b;
  return m;
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

// Text that compresses about threefold, different in every cluster.
Bytes Compressible(size_t n, uint32_t seed) {
  static const char* words[] = {"alpha", "beta", "gamma", "delta", "qcow2", "cluster", "sector", "refcount"};
  std::mt19937 rng(seed);
  std::string s;
  while (s.size() < n) s += fmt::format("{} {} ", words[rng() % 8], rng() % 100000);
  return Bytes(s.begin(), s.begin() + ptrdiff_t(n));
}

// (guest cluster, raw L2 entry) of every non-zero entry, read by hand from
// the L1 and L2 tables (standard 8-byte entries).
std::vector<std::pair<uint64_t, uint64_t>> L2Entries(const Bytes& f) {
  const uint32_t cb = uint32_t(Be(f, 20, 4));
  const uint64_t cs = 1ull << cb, per_table = cs / 8;
  const uint64_t l1_size = Be(f, 36, 4), l1_off = Be(f, 40, 8);
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (uint64_t i = 0; i < l1_size; ++i) {
    const uint64_t l2 = Be(f, l1_off + 8 * i, 8) & 0x00fffffffffffe00ull;
    if (!l2) continue;
    for (uint64_t j = 0; j < per_table; ++j) {
      const uint64_t e = Be(f, l2 + 8 * j, 8);
      if (e) out.emplace_back(i * per_table + j, e);
    }
  }
  return out;
}

// The exact length of the compressed stream at in (it decompresses to
// exactly cs bytes equal to want); 0 if it does not.
size_t DeflateLength(std::span<const uint8_t> in, const Bytes& want) {
  z_stream z = {};
  REQUIRE(inflateInit2(&z, -12) == Z_OK);
  Bytes out(want.size());
  z.next_in = const_cast<uint8_t*>(in.data());
  z.avail_in = uInt(in.size());
  z.next_out = out.data();
  z.avail_out = uInt(out.size());
  const int r = inflate(&z, Z_FINISH);
  const size_t used = z.total_in;
  inflateEnd(&z);
  return r == Z_STREAM_END && out == want ? used : 0;
}

size_t ZstdLength(std::span<const uint8_t> in, const Bytes& want) {
  const size_t n = ZSTD_findFrameCompressedSize(in.data(), in.size());
  if (ZSTD_isError(n)) return 0;
  Bytes out(want.size());
  const size_t got = ZSTD_decompress(out.data(), out.size(), in.data(), n);
  return !ZSTD_isError(got) && got == want.size() && out == want ? n : 0;
}

}  // namespace

TEST_CASE("reserved masks and flags are the bits qcow2.rst names") {
  CHECK(kOffsetMask == Bits(9, 55));
  CHECK(kFlagCopied == 1ull << 63);
  CHECK(kFlagCompressed == 1ull << 62);
  CHECK(kFlagZero == 1ull);
  CHECK(kL2ReservedMask == uint64_t(Bits(1, 8) | Bits(56, 61)));
  CHECK(kL1ReservedMask == uint64_t(Bits(0, 8) | Bits(56, 62)));
  CHECK(kRefTableReservedMask == Bits(0, 8));
}

TEST_CASE("offsets come out of L1, L2 and refcount-table entries without their flags") {
  const uint64_t off = 0x0000123456789a00ull;
  CHECK(L1Offset(off | kFlagCopied) == off);
  CHECK(L2Offset(off | kFlagCopied | kFlagZero) == off);
  CHECK(L1Offset(~0ull) == Bits(9, 55));
  CHECK(L2Offset(~0ull) == Bits(9, 55));
  CHECK(L2Offset(Bits(0, 8) | Bits(56, 63)) == 0);
  CHECK(L1Offset(0x00ff000000000000ull) == 0x00ff000000000000ull);  // bit 55 is still offset
  CHECK(L1Offset(0x0100000000000000ull) == 0);                        // bit 56 is not
  // Refcount table entries use bits 9-63.
  CHECK(RefTableOffset(~0ull) == Bits(9, 63));
  CHECK(RefTableOffset(0x10000 | 0x1ff) == 0x10000);
  CHECK(IsCompressed(kFlagCompressed));
  CHECK(IsCompressed(kFlagCompressed | kFlagCopied | 12345));
  CHECK_FALSE(IsCompressed(kFlagCopied | off));
}

TEST_CASE("compressed descriptors: hand-computed examples") {
  SUBCASE("64 KiB clusters: x = 54") {
    const uint32_t cb = 16;
    // 0x1ff00 (cluster 1, 256 bytes before its end), 0x200 bytes: sectors
    // 0x1fe00..0x201ff, two of them, one additional.
    const uint64_t e = EncodeCompressed(0x1ff00, 0x200, cb);
    CHECK(e == uint64_t(kFlagCompressed | (1ull << 54) | 0x1ff00));
    CompressedDescriptor d = DecodeCompressed(e, cb);
    CHECK(d.offset == 0x1ff00);
    CHECK(d.sectors == 2);
    CHECK(d.bytes == 0x300);  // to the end of the last sector
    CHECK(FirstHostCluster(d, cb) == 1);
    CHECK(LastHostCluster(d, cb) == 2);
    // Ending exactly at the cluster boundary stays in one cluster.
    d = DecodeCompressed(EncodeCompressed(0x1fe00, 0x200, cb), cb);
    CHECK(d.sectors == 1);
    CHECK(d.bytes == 0x200);
    CHECK(FirstHostCluster(d, cb) == 1);
    CHECK(LastHostCluster(d, cb) == 1);
    // One byte.
    d = DecodeCompressed(EncodeCompressed(0x30001, 1, cb), cb);
    CHECK(d.sectors == 1);
    CHECK(d.bytes == 511);
    CHECK(LastHostCluster(d, cb) == 3);
  }
  SUBCASE("512-byte clusters: x = 61, one bit of sector count") {
    const uint32_t cb = 9;
    const uint64_t e = EncodeCompressed(0x1234567ull * 512 + 100, 500, cb);
    CHECK(e == uint64_t(kFlagCompressed | (1ull << 61) | (0x1234567ull * 512 + 100)));
    CompressedDescriptor d = DecodeCompressed(e, cb);
    CHECK(d.sectors == 2);
    CHECK(FirstHostCluster(d, cb) == 0x1234567);
    CHECK(LastHostCluster(d, cb) == 0x1234568);
  }
  SUBCASE("2 MiB clusters: x = 49, 13 bits of sector count") {
    const uint32_t cb = 21;
    const uint64_t off = (1ull << 49) - 512 * 3 + 7;  // the highest offsets x bits reach
    const uint64_t e = EncodeCompressed(off, 2u << 20, cb);
    CompressedDescriptor d = DecodeCompressed(e, cb);
    CHECK(d.offset == off);
    CHECK(d.sectors == (7 + (2u << 20) + 511) / 512);
    CHECK(((e & Bits(49, 61)) >> 49) == d.sectors - 1);
  }
  SUBCASE("COPIED never leaks into the offset or the sector count") {
    for (uint32_t cb = 9; cb <= 21; ++cb) {
      const uint64_t e = EncodeCompressed(0x12345, 700, cb);
      const CompressedDescriptor a = DecodeCompressed(e, cb), b = DecodeCompressed(e | kFlagCopied, cb);
      CHECK(a.offset == b.offset);
      CHECK(a.sectors == b.sectors);
      CHECK(a.bytes == b.bytes);
    }
  }
}

TEST_CASE("EncodeCompressed and DecodeCompressed round trip for cluster_bits 9..21") {
  std::mt19937_64 rng(42);
  for (uint32_t cb = 9; cb <= 21; ++cb) {
    CAPTURE(cb);
    const uint64_t cs = 1ull << cb;
    const uint32_t x = 62 - (cb - 8);
    // Offsets below 2^min(x, 56), any alignment.
    const uint64_t limit = 1ull << std::min<uint32_t>(x, 56);
    std::vector<uint64_t> offsets = {cs, cs + 1, cs + 511, 2 * cs - 1, 7 * cs + 300, limit - cs, limit - 1};
    for (int i = 0; i < 50; ++i) offsets.push_back(cs + rng() % (limit - 2 * cs));
    for (uint64_t off : offsets) {
      // Lengths up to a whole cluster (stored compressed data is never longer).
      for (uint64_t len : {uint64_t(1), uint64_t(511), uint64_t(512), uint64_t(513), cs / 2 + 3, cs - 1, cs}) {
        if (len > cs || off + len > limit) continue;
        const uint64_t e = EncodeCompressed(off, len, cb);
        CAPTURE(off);
        CAPTURE(len);
        // QEMU's formula (qcow2_alloc_compressed_cluster_offset).
        const uint64_t nb_csectors = ((off + len - 1) >> 9) - (off >> 9);
        REQUIRE(e == uint64_t(kFlagCompressed | (nb_csectors << x) | off));
        CHECK((e & kFlagCopied) == 0);
        const CompressedDescriptor d = DecodeCompressed(e, cb);
        CHECK(d.offset == off);
        CHECK(d.sectors == nb_csectors + 1);
        CHECK(d.bytes >= len);
        CHECK(d.bytes < len + 512);
        CHECK((d.offset + d.bytes) % 512 == 0);
        CHECK(FirstHostCluster(d, cb) == off >> cb);
        CHECK(LastHostCluster(d, cb) == (off + len - 1) >> cb);
      }
    }
  }
}

// The descriptors of real compressed images: parse each L2 entry by hand,
// find the exact stream length by decompressing, and require that
// EncodeCompressed(offset, length) reproduces QEMU's entry bit for bit.
TEST_CASE("descriptors from qemu-img convert -c") {
  testing::RequireCommand("qemu-img");
  TempDir dir;
  struct Case {
    uint32_t cluster_size;
    std::string compression;
  };
  for (const Case& c : std::vector<Case>{{512, "zlib"}, {4096, "zlib"}, {65536, "zlib"}, {2u << 20, "zlib"},
                                         {4096, "zstd"}, {65536, "zstd"}, {1u << 20, "zstd"}}) {
    CAPTURE(c.cluster_size);
    CAPTURE(c.compression);
    const uint32_t cb = uint32_t(__builtin_ctz(c.cluster_size));
    const uint64_t cs = c.cluster_size;
    const uint64_t clusters = cs >= (1u << 20) ? 4 : std::max<uint64_t>(64, (1u << 20) / cs);
    const Bytes src = Compressible(clusters * cs, cb);
    {
      std::ofstream(dir / "src.raw", std::ios::binary).write(reinterpret_cast<const char*>(src.data()), ptrdiff_t(src.size()));
    }
    const std::string img = dir / "c.qcow2";
    auto r = testing::Run(fmt::format("rm -f {0} && qemu-img convert -c -O qcow2 -o cluster_size={1},compression_type={2} {3} {0}",
                                      Sh(img), cs, c.compression, Sh(dir / "src.raw")));
    REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    const Bytes f = ReadAll(img);
    const auto entries = L2Entries(f);
    uint64_t compressed = 0;
    for (const auto& ge : entries) {
      const auto [g, e] = ge;
      CAPTURE(ge.first);  // not the bindings: clang 14 (the sanitizer build) cannot capture one in CAPTURE
      CAPTURE(ge.second);
      REQUIRE(g < clusters);
      if (!IsCompressed(e)) continue;  // QEMU stores clusters that do not shrink as they are
      ++compressed;
      CHECK((e & kFlagCopied) == 0);
      const CompressedDescriptor d = DecodeCompressed(e, cb);
      // By hand from qcow2.rst.
      const uint32_t x = 62 - (cb - 8);
      CHECK(d.offset == (e & ((1ull << x) - 1)));
      CHECK(d.sectors == ((e >> x) & ((1ull << (cb - 8)) - 1)) + 1);
      REQUIRE(d.offset >= cs);
      REQUIRE(d.offset + d.bytes <= f.size() + 511);
      const size_t avail = std::min<uint64_t>(d.bytes, f.size() - d.offset);
      std::span<const uint8_t> in(f.data() + d.offset, avail);
      const Bytes want(src.begin() + ptrdiff_t(g * cs), src.begin() + ptrdiff_t((g + 1) * cs));
      const size_t len = c.compression == "zstd" ? ZstdLength(in, want) : DeflateLength(in, want);
      REQUIRE_MESSAGE(len > 0, "the descriptor's bytes do not hold the cluster's compressed data");
      CHECK(len <= d.bytes);
      CHECK(len + 512 > d.bytes);  // the last sector holds some of it
      CHECK(EncodeCompressed(d.offset, len, cb) == (e & ~kFlagCopied));
      CHECK(FirstHostCluster(d, cb) == d.offset / cs);
      CHECK(LastHostCluster(d, cb) == (d.offset + len - 1) / cs);
      CHECK(LastHostCluster(d, cb) * cs < f.size());
    }
    CHECK(compressed * 2 > clusters);  // most clusters did compress
  }
}
