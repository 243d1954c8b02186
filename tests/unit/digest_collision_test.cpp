// Forced fingerprint collisions (SetDigestBytesForTesting keeps one byte of
// every digest): with verify (write --verify, -o verify=on) the write path
// compares bytes before it shares a cluster, so data that collides is
// stored apart and reads back right, while true duplicates are still
// linked, in the session that stored them and after a reopen. Without
// verify the fingerprint is trusted (SHA-256's first 160 bits, where a
// collision is not expected to happen): the second half shows that the
// hook does force collisions, which then link different data.
#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <string>

#include "dedup/sha256.h"
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

}  // namespace

TEST_CASE("with verify, colliding fingerprints never link different data; true duplicates still link") {
  OneByteDigests collide;
  {
    const std::vector<uint8_t> a = Clusters(1);
    const Digest d = Sha256(std::span(a.data(), kCs));
    CHECK(std::all_of(d.begin() + 1, d.end(), [](uint8_t x) { return x == 0; }));  // the hook is on
  }
  TempDir dir;
  const std::string path = dir / "v.qcow2";
  CreateOptions co;
  co.virtual_size = 3 * kDistinct * kCs;
  co.cluster_size = kCs;
  REQUIRE(Image::Create(path, co).ok());
  const std::vector<uint8_t> data = Clusters(7);
  std::vector<uint8_t> want(co.virtual_size);
  {
    auto img = OpenWritable(path, true);
    REQUIRE(img->Write(0, data).ok());
    REQUIRE(img->Write(kDistinct * kCs, data).ok());
    CHECK(img->write_stats().new_clusters == kDistinct);
    CHECK(img->write_stats().dedup_hits == kDistinct);
    REQUIRE(img->Close().ok());
  }
  {
    // Reopened: the stored index is searched where it lies, entries checked against the data.
    auto img = OpenWritable(path, true);
    REQUIRE(img->Write(2 * kDistinct * kCs, data).ok());
    CHECK(img->write_stats().new_clusters == 0);
    CHECK(img->write_stats().dedup_hits == kDistinct);
    REQUIRE(img->Close().ok());
  }
  for (int i = 0; i < 3; ++i) std::copy(data.begin(), data.end(), want.begin() + long(i * kDistinct * kCs));
  CHECK(ReadAll(path) == want);
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  CheckQemuClean(path);
}

TEST_CASE("without verify the fingerprint is trusted: forced collisions do link different data") {
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
