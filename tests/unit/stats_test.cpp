// dedup-stats on images built through the library with known duplicates,
// and --simulate judged by the independent oracle.
#include <doctest/doctest.h>

#include "dedup/index_table.h"
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "dedup/sha256.h"
#include "image/image_state.h"
#include "qcow2dedup/convert.h"
#include "qcow2dedup/stats.h"
#include "stats/digest_set.h"
#include "stats/histogram.h"
#include "support/process.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Run;
using testing::Sh;
using testing::TempDir;

namespace {

constexpr uint64_t kCs = 4096;

std::vector<uint8_t> Pattern(uint8_t seed, size_t n = kCs) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = uint8_t(seed * 31 + i * 7 + (i >> 8));
  return v;
}

std::unique_ptr<Image> CreateImage(const std::string& path, uint64_t size, uint32_t cs = kCs) {
  CreateOptions o;
  o.virtual_size = size;
  o.cluster_size = cs;
  auto img = Image::Create(path, o);
  REQUIRE_MESSAGE(img.ok(), img.status().message());
  return std::move(img).value();
}

void WriteAt(Image& img, uint64_t cluster, const std::vector<uint8_t>& data) {
  Status st = img.Write(cluster * img.cluster_size(), data);
  REQUIRE_MESSAGE(st.ok(), st.message());
}

DedupStats Stats(const std::string& path, size_t top = 10) {
  auto st = ComputeDedupStats(path, top, false);
  REQUIRE_MESSAGE(st.ok(), st.status().message());
  return std::move(st).value();
}

uint64_t HostOf(const std::string& path, uint64_t guest_cluster) {
  auto img = Image::Open(path, {});
  REQUIRE(img.ok());
  auto e = StateOf(**img).map->GetEntry(guest_cluster);
  REQUIRE(e.ok());
  return L2Offset(*e);
}

void CheckSums(const DedupStats& s) {
  uint64_t stored = 0, refs = 0;
  for (const auto& b : s.histogram) {
    stored += b.stored_clusters;
    refs += b.references;
  }
  CHECK(stored == s.stored_clusters);
  CHECK(refs == s.data_clusters);
  CHECK(s.data_clusters + s.zero_clusters + s.backing_clusters == s.guest_clusters);
}

struct Expected {
  uint64_t clusters, nonzero, unique;
};

// The oracle's answer for each size, in order.
std::vector<Expected> Oracle(const std::string& raw, const std::vector<uint64_t>& sizes) {
  std::string cmd = "python3 " + Sh(QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py") + " " + Sh(raw);
  for (uint64_t cs : sizes) cmd += " " + std::to_string(cs);
  auto r = Run(cmd);
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  std::vector<Expected> out;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    auto j = nlohmann::json::parse(line);
    out.push_back({j["clusters"], j["nonzero"], j["unique"]});
  }
  REQUIRE(out.size() == sizes.size());
  return out;
}

std::vector<Simulation> Simulate(BlockDevice& dev, const std::vector<uint64_t>& sizes) {
  auto r = SimulateDedup(dev, sizes);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  return std::move(r).value();
}

std::unique_ptr<BlockDevice> OpenDevice(const std::string& path) {
  auto dev = OpenBlockDevice(path, ImageFormat::kAuto);
  REQUIRE_MESSAGE(dev.ok(), dev.status().message());
  return std::move(dev).value();
}

void PutAt(int fd, uint64_t offset, const std::vector<uint8_t>& data) {
  REQUIRE(::pwrite(fd, data.data(), data.size(), off_t(offset)) == ssize_t(data.size()));
}

// A raw file that tells cluster sizes apart: duplicates at 512-byte, 4K
// and 64K granularity, zero runs, a 16 MiB hole, and a length that no
// cluster size divides.
std::string MakeRaw(const TempDir& dir) {
  std::string path = dir / "disk.raw";
  int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
  REQUIRE(fd >= 0);
  std::mt19937_64 rng(42);
  auto random = [&](size_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = uint8_t(rng());
    return v;
  };
  const auto sector_a = random(512), sector_b = random(512), page = random(4096), big = random(65536);
  uint64_t at = 0;
  // 1 MiB of sectors drawn from three, so 512-byte clusters dedup well and
  // larger ones less.
  for (int i = 0; i < 2048; ++i, at += 512) {
    int pick = int(rng() % 4);
    if (pick == 0) PutAt(fd, at, sector_a);
    else if (pick == 1) PutAt(fd, at, sector_b);
    else if (pick == 2) PutAt(fd, at, std::vector<uint8_t>(512, 0));
    else if (rng() % 8 == 0) PutAt(fd, at, random(512));
    else PutAt(fd, at, sector_a);
  }
  // The same page many times, some of them off 4K alignment.
  for (int i = 0; i < 64; ++i, at += 4096 + (i % 5 == 0 ? 512 : 0)) PutAt(fd, at, page);
  at = (at + 65535) / 65536 * 65536;
  for (int i = 0; i < 8; ++i, at += 65536) PutAt(fd, at, big);
  PutAt(fd, at, random(3 << 20));  // unique data
  at += 3 << 20;
  at += 16 << 20;                  // a hole
  for (int i = 0; i < 4; ++i, at += 65536) PutAt(fd, at, big);
  PutAt(fd, at, random(1000));     // ends mid-cluster
  ::close(fd);
  return path;
}

}  // namespace

TEST_CASE("histogram buckets are powers of two") {
  CHECK(HistogramBucketOf(1) == 0);
  CHECK(HistogramBucketOf(2) == 1);
  CHECK(HistogramBucketOf(3) == 2);
  CHECK(HistogramBucketOf(4) == 2);
  CHECK(HistogramBucketOf(5) == 3);
  CHECK(HistogramBucketOf(8) == 3);
  CHECK(HistogramBucketOf(9) == 4);
  CHECK(HistogramBucketOf(65535) == 16);
  CHECK(HistogramBucketOf(65536) == 16);
  CHECK(HistogramBucketOf(65537) == 17);
}

TEST_CASE("digest set counts distinct 128-bit prefixes") {
  DigestSet set;
  std::vector<Digest> digests;
  for (uint32_t i = 0; i < 100000; ++i) {
    uint8_t in[4] = {uint8_t(i), uint8_t(i >> 8), uint8_t(i >> 16), 0};
    digests.push_back(Sha256(in));
  }
  for (const auto& d : digests) CHECK(set.Insert(d.data()));
  for (const auto& d : digests) CHECK_FALSE(set.Insert(d.data()));
  Digest zero{};
  CHECK(set.Insert(zero.data()));
  CHECK_FALSE(set.Insert(zero.data()));
  // Only the prefix counts.
  Digest other = digests[7];
  other[31] ^= 1;
  CHECK_FALSE(set.Insert(other.data()));
  CHECK(set.size() == 100001);
  CHECK(set.MemoryBytes() <= 100001 * 24);
}

TEST_CASE("stats of an image with known duplicates") {
  TempDir dir;
  const std::string path = dir / "img.qcow2";
  {
    auto img = CreateImage(path, 1 << 20);  // 256 clusters, one L2 table
    const auto a = Pattern(1), b = Pattern(2), c = Pattern(3), d = Pattern(4);
    for (uint64_t g : {0, 1, 2, 3, 10}) WriteAt(*img, g, a);       // 5 references
    for (uint64_t g : {4, 5}) WriteAt(*img, g, b);                 // 2
    for (uint64_t g : {6, 7, 8}) WriteAt(*img, g, Pattern(uint8_t(10 + g)));  // unique
    WriteAt(*img, 9, std::vector<uint8_t>(kCs, 0));                // zero: not stored
    for (uint64_t g = 20; g < 29; ++g) WriteAt(*img, g, c);        // 9
    for (uint64_t g : {40, 41}) WriteAt(*img, g, d);               // 2, stored after b
    REQUIRE(img->Close().ok());
  }
  DedupStats s = Stats(path);
  CHECK(s.filename == path);
  CHECK(s.virtual_size == 1 << 20);
  CHECK(s.cluster_size == kCs);
  CHECK(s.guest_clusters == 256);
  CHECK(s.data_clusters == 21);
  CHECK(s.stored_clusters == 7);
  CHECK(s.zero_clusters == 256 - 21);
  CHECK(s.backing_clusters == 0);
  CHECK(s.dedup_ratio == doctest::Approx(3.0));
  CHECK(s.saved_bytes == 14 * kCs);
  CHECK(s.saving_percent == doctest::Approx(100.0 * 14 / 21));

  REQUIRE(s.histogram.size() == 5);
  const uint64_t want[5][4] = {{1, 1, 3, 3}, {2, 2, 2, 4}, {3, 4, 0, 0}, {5, 8, 1, 5}, {9, 16, 1, 9}};
  for (int k = 0; k < 5; ++k) {
    CAPTURE(k);
    CHECK(s.histogram[k].refcount_min == want[k][0]);
    CHECK(s.histogram[k].refcount_max == want[k][1]);
    CHECK(s.histogram[k].stored_clusters == want[k][2]);
    CHECK(s.histogram[k].references == want[k][3]);
  }
  CheckSums(s);

  // Shared clusters only, most shared first, ties by host offset.
  REQUIRE(s.top.size() == 4);
  CHECK(s.top[0].refcount == 9);
  CHECK(s.top[0].host_offset == HostOf(path, 20));
  std::vector<uint64_t> c_offsets;
  for (uint64_t g = 20; g < 28; ++g) c_offsets.push_back(g * kCs);
  CHECK(s.top[0].guest_offsets == c_offsets);
  CHECK(s.top[1].refcount == 5);
  CHECK(s.top[1].host_offset == HostOf(path, 0));
  CHECK(s.top[1].guest_offsets == std::vector<uint64_t>{0, kCs, 2 * kCs, 3 * kCs, 10 * kCs});
  CHECK(s.top[2].refcount == 2);
  CHECK(s.top[3].refcount == 2);
  CHECK(s.top[2].host_offset == HostOf(path, 4));
  CHECK(s.top[3].host_offset == HostOf(path, 40));
  CHECK(s.top[2].host_offset < s.top[3].host_offset);
  CHECK(s.top[3].guest_offsets == std::vector<uint64_t>{40 * kCs, 41 * kCs});

  DedupStats two = Stats(path, 2);
  REQUIRE(two.top.size() == 2);
  CHECK(two.top[1].host_offset == s.top[1].host_offset);
  CHECK(Stats(path, 0).top.empty());

  auto img = Image::Open(path, {});
  REQUIRE(img.ok());
  const Header& h = StateOf(**img).header;
  CHECK(s.metadata.l1 == kCs);
  CHECK(s.metadata.l2 == kCs);
  CHECK(s.metadata.refcount == (h.reftable_clusters + 1) * kCs);
  CHECK(s.metadata.index == IndexTableBytes(IndexBucketsFor(7)));  // one bucket
  CHECK(s.metadata.total() == s.metadata.l1 + s.metadata.l2 + s.metadata.refcount + s.metadata.index);
}

TEST_CASE("stats follow overwrites") {
  TempDir dir;
  const std::string path = dir / "img.qcow2";
  const auto a = Pattern(1);
  {
    auto img = CreateImage(path, 8 << 20);  // 4 L2 tables' worth
    for (uint64_t g : {0, 600, 1200, 1800}) WriteAt(*img, g, a);
    REQUIRE(img->Close().ok());
  }
  {
    auto img = Image::Open(path, {.writable = true});
    REQUIRE(img.ok());
    WriteAt(**img, 600, Pattern(9));
    WriteAt(**img, 1200, std::vector<uint8_t>(kCs, 0));
    REQUIRE((*img)->Close().ok());
  }
  DedupStats s = Stats(path);
  CHECK(s.guest_clusters == 2048);
  CHECK(s.data_clusters == 3);
  CHECK(s.stored_clusters == 2);
  CHECK(s.zero_clusters == 2045);
  CHECK(s.metadata.l2 == 4 * kCs);
  REQUIRE(s.top.size() == 1);
  CHECK(s.top[0].refcount == 2);
  CHECK(s.top[0].guest_offsets == std::vector<uint64_t>{0, 1800 * kCs});
  CheckSums(s);
}

TEST_CASE("stats of an empty image") {
  TempDir dir;
  const std::string path = dir / "img.qcow2";
  REQUIRE(CreateImage(path, 10 << 20, 65536)->Close().ok());
  DedupStats s = Stats(path);
  CHECK(s.guest_clusters == 160);
  CHECK(s.data_clusters == 0);
  CHECK(s.stored_clusters == 0);
  CHECK(s.zero_clusters == 160);
  CHECK(s.dedup_ratio == 1.0);
  CHECK(s.saved_bytes == 0);
  CHECK(s.saving_percent == 0.0);
  CHECK(s.histogram.empty());
  CHECK(s.top.empty());
  CHECK(s.metadata.l2 == 0);
  CHECK(s.metadata.index == 0);
}

TEST_CASE("stats count unallocated clusters over a backing file apart") {
  testing::RequireCommand("qemu-img");
  TempDir dir;
  const std::string base = dir / "base.raw", overlay = dir / "overlay.qcow2";
  REQUIRE(Run("truncate -s 1M " + Sh(base)).exit_code == 0);
  auto r = Run("qemu-img create -q -f qcow2 -o cluster_size=4096 -b " + Sh(base) + " -F raw " + Sh(overlay) + " 2M");
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  {
    auto img = Image::Open(overlay, {.writable = true});
    REQUIRE_MESSAGE(img.ok(), img.status().message());
    WriteAt(**img, 0, Pattern(1));
    WriteAt(**img, 1, Pattern(1));
    WriteAt(**img, 2, std::vector<uint8_t>(kCs, 0));  // zero-flagged: the backing file shows through otherwise
    WriteAt(**img, 300, Pattern(2));                   // past the backing file's end
    REQUIRE((*img)->Close().ok());
  }
  DedupStats s = Stats(overlay);
  CHECK(s.guest_clusters == 512);
  CHECK(s.data_clusters == 3);
  CHECK(s.stored_clusters == 2);
  CHECK(s.zero_clusters == 1 + 255);    // the zero flag, and unallocated past 1 MiB
  CHECK(s.backing_clusters == 256 - 3); // unallocated below 1 MiB
  CheckSums(s);
}

TEST_CASE("stats of images QEMU wrote: compressed clusters and extended L2") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  SUBCASE("compressed clusters count as data, each stored once") {
    const std::string raw = MakeRaw(dir), image = dir / "c.qcow2";
    auto r = Run("qemu-img convert -c -O qcow2 -o cluster_size=65536 " + Sh(raw) + " " + Sh(image));
    REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    auto want = Oracle(raw, {65536});
    DedupStats s = Stats(image);
    CHECK(s.data_clusters == want[0].nonzero);
    CHECK(s.stored_clusters == s.data_clusters);  // QEMU does not dedup
    CHECK(s.top.empty());
    REQUIRE(s.histogram.size() == 1);
    CHECK(s.metadata.index == 0);
    CheckSums(s);
  }
  SUBCASE("extended L2 over a backing file") {
    const std::string base = dir / "base.raw", image = dir / "x.qcow2";
    REQUIRE(Run("truncate -s 1M " + Sh(base)).exit_code == 0);
    auto r = Run("qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on -b " + Sh(base) + " -F raw " +
                 Sh(image) + " 2M && qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 128k 4k' -c 'write -z 256k 64k'" +
                 " -c 'write -z 512k 4k' -c 'write -P 1 1536k 64k' " + Sh(image));
    REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    DedupStats s = Stats(image);
    CHECK(s.guest_clusters == 32);
    CHECK(s.data_clusters == 3);
    CHECK(s.stored_clusters == 3);
    CHECK(s.zero_clusters == 1 + 15);  // all subclusters zero; unallocated past 1M
    CHECK(s.backing_clusters == 13);   // the partly zero-flagged cluster among them
    CheckSums(s);
  }
}

TEST_CASE("stats take QEMU's read lock unless told to share") {
  TempDir dir;
  const std::string path = dir / "img.qcow2";
  {
    auto img = CreateImage(path, 1 << 20);
    WriteAt(*img, 0, Pattern(1));
    REQUIRE(img->Close().ok());
  }
  auto writer = Image::Open(path, {.writable = true});
  REQUIRE(writer.ok());
  CHECK(ComputeDedupStats(path, 10, false).status().kind() == ErrorKind::kBusy);
  auto shared = ComputeDedupStats(path, 10, true);
  REQUIRE_MESSAGE(shared.ok(), shared.status().message());
  CHECK(shared->data_clusters == 1);
}

TEST_CASE("stats refuse what is not a qcow2 image") {
  TempDir dir;
  CHECK(ComputeDedupStats(dir / "missing.qcow2").status().kind() == ErrorKind::kNotFound);
  REQUIRE(Run("head -c 65536 /dev/urandom >" + Sh(dir / "x.raw")).exit_code == 0);
  CHECK_FALSE(ComputeDedupStats(dir / "x.raw").ok());
}

TEST_CASE("simulate matches the oracle at every cluster size") {
  TempDir dir;
  const std::string raw = MakeRaw(dir);
  const std::vector<uint64_t> sizes = {512, 4096, 16384, 65536, 2 << 20};
  auto want = Oracle(raw, sizes);
  auto dev = OpenDevice(raw);
  auto got = Simulate(*dev, sizes);
  REQUIRE(got.size() == sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    CAPTURE(sizes[i]);
    CHECK(got[i].cluster_size == sizes[i]);
    CHECK(got[i].clusters == want[i].clusters);
    CHECK(got[i].nonzero == want[i].nonzero);
    CHECK(got[i].unique == want[i].unique);
    CHECK(got[i].ratio == doctest::Approx(want[i].unique ? double(want[i].nonzero) / want[i].unique : 1.0));
  }
  // The file's shape is what makes the test worth having.
  CHECK(dev->virtual_size() % 512 != 0);
  CHECK(want[0].unique < want[0].nonzero);
  CHECK(want[1].unique < want[1].nonzero);
  CHECK(want[3].unique < want[3].nonzero);

  // One size alone gives what it gave among others.
  auto alone = Simulate(*dev, {65536});
  CHECK(alone[0].unique == want[3].unique);
  CHECK(alone[0].nonzero == want[3].nonzero);
}

TEST_CASE("simulate sees a dedup image's guest view as the raw file, and stats agree") {
  TempDir dir;
  const std::string raw = MakeRaw(dir), image = dir / "img.qcow2";
  auto src = OpenDevice(raw);
  {
    auto img = CreateImage(image, src->virtual_size(), 4096);
    REQUIRE(CopyInto(*src, *img).ok());
    REQUIRE(img->Close().ok());
  }
  auto from_raw = Simulate(*src, {4096, 65536});
  auto dev = OpenDevice(image);
  auto from_image = Simulate(*dev, {4096, 65536});
  for (size_t i = 0; i < 2; ++i) {
    CHECK(from_image[i].clusters == from_raw[i].clusters);
    CHECK(from_image[i].nonzero == from_raw[i].nonzero);
    CHECK(from_image[i].unique == from_raw[i].unique);
  }
  DedupStats s = Stats(image);
  CHECK(s.data_clusters == from_raw[0].nonzero);
  CHECK(s.stored_clusters == from_raw[0].unique);
  CheckSums(s);
  // The size estimate is the size convert made.
  CHECK(from_raw[0].estimated_image_size == std::filesystem::file_size(image));
}

TEST_CASE("simulate rejects cluster sizes qcow2 cannot have") {
  TempDir dir;
  const std::string raw = dir / "small.raw";
  REQUIRE(Run("head -c 10000 /dev/urandom >" + Sh(raw)).exit_code == 0);
  auto dev = OpenDevice(raw);
  for (std::vector<uint64_t> bad : {std::vector<uint64_t>{}, {256}, {3000}, {4u << 20}, {4096, 0}}) {
    auto r = SimulateDedup(*dev, bad);
    CHECK(r.status().kind() == ErrorKind::kInvalidArgument);
  }
  // Sizes come back in the order asked, repeats included.
  auto got = Simulate(*dev, {65536, 512, 65536});
  REQUIRE(got.size() == 3);
  CHECK(got[0].cluster_size == 65536);
  CHECK(got[1].cluster_size == 512);
  CHECK(got[2].cluster_size == 65536);
  CHECK(got[0].clusters == 1);
  CHECK(got[1].clusters == 20);
  CHECK(got[1].unique == 20);
}

TEST_CASE("simulate an empty and an all-zero device") {
  TempDir dir;
  const std::string empty = dir / "empty.raw", holes = dir / "holes.raw";
  REQUIRE(Run("touch " + Sh(empty) + " && truncate -s 100M " + Sh(holes)).exit_code == 0);
  auto e = Simulate(*OpenDevice(empty), {4096});
  CHECK(e[0].clusters == 0);
  CHECK(e[0].unique == 0);
  CHECK(e[0].ratio == 1.0);
  std::vector<std::pair<uint64_t, uint64_t>> seen;
  auto dev = OpenDevice(holes);
  auto r = SimulateDedup(*dev, {4096}, [&](uint64_t done, uint64_t total) { seen.push_back({done, total}); });
  REQUIRE(r.ok());
  CHECK((*r)[0].clusters == 25600);
  CHECK((*r)[0].nonzero == 0);
  CHECK((*r)[0].ratio == 1.0);
  REQUIRE(!seen.empty());
  CHECK(seen.back() == std::pair<uint64_t, uint64_t>{100 << 20, 100 << 20});
}
