// format/compression: Decompress of raw deflate (zlib, windowBits -12, as
// QEMU writes it) and zstd clusters, with the padding that follows them in
// an image, and its refusal of anything that is not one whole cluster.
#include "format/compression.h"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <zlib.h>
#include <zstd.h>

#include <atomic>
#include <fstream>
#include <thread>
#include <random>

#include "format/entries.h"
#include "support/process.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Sh;
using testing::TempDir;

namespace {

using Bytes = std::vector<uint8_t>;

Bytes Text(size_t n, uint32_t seed) {
  static const char* words[] = {"alpha", "beta", "gamma", "delta", "qcow2", "cluster", "sector", "zstd"};
  std::mt19937 rng(seed);
  std::string s;
  while (s.size() < n) s += fmt::format("{} {} ", words[rng() % 8], rng() % 100000);
  return Bytes(s.begin(), s.begin() + ptrdiff_t(n));
}

Bytes Noise(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes b(n);
  for (auto& c : b) c = uint8_t(rng());
  return b;
}

// As QEMU's qcow2_zlib_compress: raw deflate, 4 KiB window.
Bytes Deflate(const Bytes& in, int window_bits = -12) {
  z_stream z = {};
  REQUIRE(deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, window_bits, 9, Z_DEFAULT_STRATEGY) == Z_OK);
  Bytes out(deflateBound(&z, uLong(in.size())) + 64);
  z.next_in = const_cast<uint8_t*>(in.data());
  z.avail_in = uInt(in.size());
  z.next_out = out.data();
  z.avail_out = uInt(out.size());
  REQUIRE(deflate(&z, Z_FINISH) == Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

Bytes Zstd(const Bytes& in) {
  Bytes out(ZSTD_compressBound(in.size()));
  const size_t n = ZSTD_compress(out.data(), out.size(), in.data(), in.size(), 3);
  REQUIRE_FALSE(ZSTD_isError(n));
  out.resize(n);
  return out;
}

// Pads to the end of the 512-byte sector, as the data sits in an image
// (offset bytes into its first sector), with what follows it there.
Bytes Padded(Bytes c, size_t offset_in_sector, uint8_t fill) {
  const size_t end = (offset_in_sector + c.size() + 511) / 512 * 512 - offset_in_sector;
  c.resize(end, fill);
  return c;
}

Status Run(CompressionType t, const Bytes& in, Bytes& out) { return Decompress(t, in, out); }

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

TEST_CASE("deflate clusters with trailing padding") {
  for (size_t cs : {size_t(512), size_t(4096), size_t(65536), size_t(2u << 20)}) {
    CAPTURE(cs);
    const Bytes plain = Text(cs, uint32_t(cs));
    const Bytes c = Deflate(plain);
    REQUIRE(c.size() < cs);
    for (size_t off : {size_t(0), size_t(1), size_t(300), size_t(511)}) {
      for (uint8_t fill : {uint8_t(0), uint8_t(0xff), uint8_t(0x78)}) {
        CAPTURE(off);
        CAPTURE(int(fill));
        Bytes out(cs, 0xee);
        Status st = Run(CompressionType::kDeflate, Padded(c, off, fill), out);
        REQUIRE_MESSAGE(st.ok(), st.message());
        CHECK(out == plain);
      }
    }
    // The exact stream, no padding at all.
    Bytes out(cs);
    REQUIRE(Run(CompressionType::kDeflate, c, out).ok());
    CHECK(out == plain);
    // Another cluster's stream in the padding (QEMU packs them tightly).
    Bytes two = c;
    const Bytes other = Deflate(Text(cs, 99));
    two.insert(two.end(), other.begin(), other.end());
    REQUIRE(Run(CompressionType::kDeflate, two, out).ok());
    CHECK(out == plain);
  }
}

TEST_CASE("zstd clusters with trailing padding") {
  for (size_t cs : {size_t(512), size_t(4096), size_t(65536), size_t(2u << 20)}) {
    CAPTURE(cs);
    const Bytes plain = Text(cs, uint32_t(cs) + 1);
    const Bytes c = Zstd(plain);
    for (size_t off : {size_t(0), size_t(7), size_t(511)}) {
      for (uint8_t fill : {uint8_t(0), uint8_t(0xff), uint8_t(0x28)}) {
        CAPTURE(off);
        CAPTURE(int(fill));
        Bytes out(cs, 0xee);
        Status st = Run(CompressionType::kZstd, Padded(c, off, fill), out);
        REQUIRE_MESSAGE(st.ok(), st.message());
        CHECK(out == plain);
      }
    }
    Bytes out(cs);
    Bytes two = c;
    const Bytes other = Zstd(Text(cs, 7));
    two.insert(two.end(), other.begin(), other.end());
    REQUIRE(Run(CompressionType::kZstd, two, out).ok());
    CHECK(out == plain);
  }
}

TEST_CASE("an incompressible cluster still round trips") {
  const Bytes plain = Noise(65536, 3);
  Bytes out(65536);
  REQUIRE(Run(CompressionType::kDeflate, Padded(Deflate(plain), 0, 0), out).ok());
  CHECK(out == plain);
  REQUIRE(Run(CompressionType::kZstd, Padded(Zstd(plain), 0, 0), out).ok());
  CHECK(out == plain);
}

TEST_CASE("garbage and broken streams fail as corruption") {
  const size_t cs = 65536;
  const Bytes plain = Text(cs, 5);
  Bytes out(cs);
  for (CompressionType t : {CompressionType::kDeflate, CompressionType::kZstd}) {
    CAPTURE(int(t));
    const Bytes good = t == CompressionType::kZstd ? Zstd(plain) : Deflate(plain);
    SUBCASE("noise") {
      Status st = Run(t, Noise(4096, 11), out);
      CHECK(st.kind() == ErrorKind::kCorruption);
      CHECK_FALSE(st.message().empty());
    }
    SUBCASE("zeros") { CHECK(Run(t, Bytes(4096, 0), out).kind() == ErrorKind::kCorruption); }
    SUBCASE("nothing") { CHECK(Run(t, Bytes(), out).kind() == ErrorKind::kCorruption); }
    SUBCASE("cut short") {
      for (size_t keep : {size_t(1), good.size() / 2}) {
        CAPTURE(keep);
        CHECK(Run(t, Bytes(good.begin(), good.begin() + ptrdiff_t(keep)), out).kind() == ErrorKind::kCorruption);
      }
      // Without its last byte a deflate stream may still yield the whole
      // cluster (that byte can hold just the end-of-block code), which QEMU
      // accepts too; whatever comes out is then the right data.
      std::fill(out.begin(), out.end(), 0);
      Status st = Run(t, Bytes(good.begin(), good.end() - 1), out);
      if (st.ok()) CHECK(out == plain);
      else CHECK(st.kind() == ErrorKind::kCorruption);
      if (t == CompressionType::kZstd) CHECK_FALSE(st.ok());
    }
    SUBCASE("less than a cluster of data") {
      const Bytes half(plain.begin(), plain.begin() + cs / 2);
      const Bytes c = t == CompressionType::kZstd ? Zstd(half) : Deflate(half);
      CHECK(Run(t, Padded(c, 0, 0), out).kind() == ErrorKind::kCorruption);
    }
    SUBCASE("a flipped bit in the middle") {
      Bytes bad = good;
      bad[bad.size() / 2] ^= 0x10;
      Status st = Run(t, bad, out);
      // Some flips still decode (to other bytes); none may crash, and a
      // success must not claim the original data.
      if (st.ok()) CHECK(out != plain);
      else CHECK(st.kind() == ErrorKind::kCorruption);
    }
  }
}

TEST_CASE("the other compression's data fails") {
  const Bytes plain = Text(65536, 8);
  Bytes out(65536);
  CHECK_FALSE(Run(CompressionType::kDeflate, Padded(Zstd(plain), 0, 0), out).ok());
  CHECK_FALSE(Run(CompressionType::kZstd, Padded(Deflate(plain), 0, 0), out).ok());
}

// Clusters compressed by qemu-img convert -c, read with the descriptor's
// whole sector range (which runs into the next cluster's data).
TEST_CASE("clusters compressed by qemu-img") {
  testing::RequireCommand("qemu-img");
  TempDir dir;
  for (const char* type : {"zlib", "zstd"}) {
    for (uint32_t cs : {4096u, 65536u}) {
      CAPTURE(type);
      CAPTURE(cs);
      const Bytes src = Text(64 * size_t(cs), cs);
      std::ofstream(dir / "src.raw", std::ios::binary).write(reinterpret_cast<const char*>(src.data()), ptrdiff_t(src.size()));
      const std::string img = dir / "c.qcow2";
      auto r = testing::Run(fmt::format("rm -f {0} && qemu-img convert -c -O qcow2 -o cluster_size={1},compression_type={2} {3} {0}",
                                        Sh(img), cs, type, Sh(dir / "src.raw")));
      REQUIRE_MESSAGE(r.exit_code == 0, r.err);
      const Bytes f = ReadAll(img);
      const uint32_t cb = uint32_t(Be(f, 20, 4));
      const uint64_t l1 = Be(f, 40, 8);
      const uint64_t l2 = Be(f, l1, 8) & kOffsetMask;
      REQUIRE(l2 != 0);
      const CompressionType t = std::string(type) == "zstd" ? CompressionType::kZstd : CompressionType::kDeflate;
      int compressed = 0;
      for (uint64_t g = 0; g < 64; ++g) {
        const uint64_t e = Be(f, l2 + 8 * g, 8);
        if (!IsCompressed(e)) continue;
        ++compressed;
        const CompressedDescriptor d = DecodeCompressed(e, cb);
        Bytes in(d.bytes, 0);  // past the end of the file reads as zero
        for (uint64_t i = 0; i < d.bytes && d.offset + i < f.size(); ++i) in[i] = f[d.offset + i];
        Bytes out(cs);
        Status st = Decompress(t, in, out);
        REQUIRE_MESSAGE(st.ok(), st.message());
        CHECK(std::equal(out.begin(), out.end(), src.begin() + ptrdiff_t(g * cs)));
      }
      CHECK(compressed > 32);
    }
  }
}

TEST_CASE("Compress: QEMU's streams, read back by zlib's and zstd's own decoders") {
  for (size_t cs : {size_t(4096), size_t(65536)}) {
    CAPTURE(cs);
    const Bytes plain = Text(cs, uint32_t(cs) + 5);
    Bytes c(cs - 512);
    // zlib: raw deflate with a 4 KiB window, as QEMU writes it; zlib's inflate
    // with windowBits -12 reads it exactly.
    size_t n = Compress(CompressionType::kDeflate, plain, c);
    REQUIRE(n > 0);
    REQUIRE(WorthCompressing(n, cs));
    z_stream z = {};
    REQUIRE(inflateInit2(&z, -12) == Z_OK);
    Bytes out(cs);
    z.next_in = c.data();
    z.avail_in = uInt(n);
    z.next_out = out.data();
    z.avail_out = uInt(out.size());
    CHECK(inflate(&z, Z_FINISH) == Z_STREAM_END);
    inflateEnd(&z);
    CHECK(out == plain);
    CHECK(Deflate(plain) == Bytes(c.begin(), c.begin() + ptrdiff_t(n)));  // QEMU's parameters, byte for byte
    // zstd: one frame, which ZSTD_decompress reads whole.
    n = Compress(CompressionType::kZstd, plain, c);
    REQUIRE(n > 0);
    std::fill(out.begin(), out.end(), 0);
    CHECK(ZSTD_decompress(out.data(), out.size(), c.data(), n) == cs);
    CHECK(out == plain);
    // Ours, with padding after it as in an image.
    Bytes padded = Padded(Bytes(c.begin(), c.begin() + ptrdiff_t(n)), 100, 0x5a);
    std::fill(out.begin(), out.end(), 0);
    REQUIRE(Decompress(CompressionType::kZstd, padded, out).ok());
    CHECK(out == plain);
  }
}

TEST_CASE("Compress: what does not fit, and what saves less than a sector") {
  const Bytes noise = Noise(65536, 9);
  Bytes c(65536 - 512);
  CHECK(Compress(CompressionType::kDeflate, noise, c) == 0);
  CHECK(Compress(CompressionType::kZstd, noise, c) == 0);
  CHECK_FALSE(WorthCompressing(0, 65536));
  CHECK(WorthCompressing(65536 - 512, 65536));
  CHECK_FALSE(WorthCompressing(65536 - 511, 65536));
  // Zeros compress to next to nothing with both.
  const Bytes zeros(65536, 0);
  const size_t z = Compress(CompressionType::kDeflate, zeros, c);
  CHECK(z > 0);
  CHECK(z < 200);
  CHECK(Compress(CompressionType::kZstd, zeros, c) > 0);
}

TEST_CASE("Compress from many threads at once gives each thread's data") {
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([t, &bad] {
      for (int i = 0; i < 50; ++i) {
        const Bytes plain = Text(4096, uint32_t(t * 1000 + i));
        Bytes c(4096 - 512), out(4096);
        const CompressionType type = i % 2 ? CompressionType::kZstd : CompressionType::kDeflate;
        const size_t n = Compress(type, plain, c);
        if (n == 0 || !Decompress(type, std::span<const uint8_t>(c).first(n), out).ok() || out != plain) ++bad;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(bad == 0);
}
