// Forced collisions. First of fingerprints (SetFingerprintBitsForTesting
// keeps 8 bits of the index's 40): the index names candidates only, and
// the write path shares a cluster only once the full SHA-256 digests are
// equal, so colliding data is stored apart and reads back right, while true
// duplicates still link: in the session that stored them, after a reopen
// (the stored table), and in an in-place dedup. Then of whole digests
// (SetDigestBytesForTesting keeps one byte): with verify (write --verify,
// -o verify=on) the bytes are compared too, so even that links nothing
// wrong; without verify equal SHA-256 digests are trusted, and the last
// case shows that the hook does force collisions, which then link.
#include <doctest/doctest.h>

#include <algorithm>
#include <fstream>
#include <random>
#include <string>

#include "dedup/index.h"
#include "dedup/sha256.h"
#include "qcow2dedup/dedup.h"
#include "qcow2dedup/image.h"
#include "support/check_helpers.h"
#include "support/image_helpers.h"
#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using namespace testing;

namespace {

constexpr uint64_t kCs = 4096;
constexpr uint64_t kDistinct = 600;  // over 256 one-byte fingerprints: many collide

struct EightBitFingerprints {
  EightBitFingerprints() { SetFingerprintBitsForTesting(8); }
  ~EightBitFingerprints() { SetFingerprintBitsForTesting(kFingerprintBits); }
};

struct OneByteDigests {
  OneByteDigests() { SetDigestBytesForTesting(1); }
  ~OneByteDigests() { SetDigestBytesForTesting(32); }
};

std::vector<uint8_t> Clusters(uint64_t seed) { return RandomBytes(kDistinct * kCs, seed); }

std::vector<uint8_t> ReadAll(const std::string& path) {
  auto img = Image::Open(path, OpenOptions{});
  REQUIRE(img.ok());
  std::vector<uint8_t> got((*img)->virtual_size());
  REQUIRE((*img)->Read(0, got).ok());
  return got;
}

// The same kDistinct clusters written three times, twice in one session
// and once after a reopen (the stored table then names the candidates):
// each is stored once and linked twice, and the image reads back right.
void WriteThriceAcrossSessions(const std::string& path, bool verify) {
  CreateOptions co;
  co.virtual_size = 3 * kDistinct * kCs;
  co.cluster_size = kCs;
  REQUIRE(Image::Create(path, co).ok());
  const std::vector<uint8_t> data = Clusters(7);
  for (uint64_t session = 0; session < 2; ++session) {
    auto img = OpenWritable(path, verify);
    for (uint64_t copy = session * 2; copy < std::min<uint64_t>(3, session * 2 + 2); ++copy)
      REQUIRE(img->Write(copy * kDistinct * kCs, data).ok());
    CHECK(img->write_stats().new_clusters == (session == 0 ? kDistinct : 0));
    CHECK(img->write_stats().dedup_hits == kDistinct);
    REQUIRE(img->Close().ok());
  }
  std::vector<uint8_t> want;
  for (int i = 0; i < 3; ++i) want.insert(want.end(), data.begin(), data.end());
  CHECK(ReadAll(path) == want);
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  CheckQemuClean(path);
}

}  // namespace

TEST_CASE("colliding fingerprints never link different data; true duplicates still link") {
  EightBitFingerprints collide;
  {
    const std::vector<uint8_t> a = Clusters(1);
    CHECK(FingerprintOf(Sha256(std::span(a.data(), kCs))) % 0x100000000ull == 0);  // the hook is on
  }
  TempDir dir;
  WriteThriceAcrossSessions(dir / "f.qcow2", false);
  const std::vector<uint8_t> data = Clusters(7);
  // In place, over an image QEMU wrote: only true copies are relinked.
  const std::string raw = dir / "twice.raw", qemu = dir / "q.qcow2";
  {
    std::ofstream out(raw, std::ios::binary);
    for (int i = 0; i < 2; ++i) out.write(reinterpret_cast<const char*>(data.data()), long(data.size()));
  }
  REQUIRE(Run("qemu-img convert -f raw -O qcow2 -o cluster_size=4096 " + Sh(raw) + " " + Sh(qemu)).exit_code == 0);
  auto done = DeduplicateImage(qemu, DedupOptions{});
  REQUIRE_MESSAGE(done.ok(), done.status().message());
  CHECK(done->stored_after == kDistinct);
  CheckQemuClean(qemu);
  CheckQemuIdentical(qemu, raw);
}

TEST_CASE("with verify, colliding digests never link different data; true duplicates still link") {
  OneByteDigests collide;
  {
    const std::vector<uint8_t> a = Clusters(1);
    const Digest d = Sha256(std::span(a.data(), kCs));
    CHECK(std::all_of(d.begin() + 1, d.end(), [](uint8_t x) { return x == 0; }));  // the hook is on
  }
  TempDir dir;
  WriteThriceAcrossSessions(dir / "v.qcow2", true);
}

TEST_CASE("without verify equal digests are trusted: forced digest collisions do link different data") {
  OneByteDigests collide;
  TempDir dir;
  const std::string path = dir / "t.qcow2";
  CreateOptions co;
  co.virtual_size = kDistinct * kCs;
  co.cluster_size = kCs;
  REQUIRE(Image::Create(path, co).ok());
  const std::vector<uint8_t> data = Clusters(7);
  {
    auto img = OpenWritable(path, false);
    REQUIRE(img->Write(0, data).ok());
    CHECK(img->write_stats().new_clusters <= 256);
    REQUIRE(img->Close().ok());
  }
  CHECK(ReadAll(path) != data);
}
