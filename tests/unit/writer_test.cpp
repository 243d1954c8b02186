// image/writer with a metadata cache of 4 tables, the fewest it takes: the
// L1 table, the refcount table and refcount blocks all grow, clusters are
// freed and shared, and a full cache is written back only between metadata
// changes (a write-back in the middle of the refcount table's growth once
// wrote past the end of the table's buffer). Judged by the data read back,
// our check and qemu-img check.
#include "image/writer.h"

#include <doctest/doctest.h>

#include <sys/stat.h>

#include <map>
#include <random>
#include <string>

#include "image/image_state.h"
#include "support/check_helpers.h"
#include "support/image_helpers.h"
#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using namespace testing;

namespace {

constexpr uint32_t kCluster = 512;
constexpr uint64_t kTinyCache = 4 * kCluster;

OpenOptions Tiny() {
  OpenOptions o;
  o.writable = true;
  o.metadata_cache_bytes = kTinyCache;
  return o;
}

std::vector<uint8_t> Pattern(uint64_t seed, size_t n) { return RandomBytes(n, seed); }

// The guest view kept beside the image, to compare with what it reads.
struct Model {
  std::vector<uint8_t> bytes;
  void Write(uint64_t off, std::span<const uint8_t> d) {
    if (off + d.size() > bytes.size()) bytes.resize(off + d.size());
    std::copy(d.begin(), d.end(), bytes.begin() + long(off));
  }
};

void CheckReadsAs(Image& img, const Model& m) {
  std::vector<uint8_t> got(img.virtual_size());
  REQUIRE(img.Read(0, got).ok());
  std::vector<uint8_t> want = m.bytes;
  want.resize(got.size(), 0);
  CHECK(got == want);
}

void CheckClean(const std::string& path) {
  CheckReport r = OurCheck(path);
  CHECK_MESSAGE(r.corruptions == 0, Messages(r));
  CHECK_MESSAGE(r.leaks == 0, Messages(r));
  CHECK(r.dedup.errors() == 0);
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  CheckQemuClean(path);
}

}  // namespace

TEST_CASE("a 4-table cache: refcount table, refcount blocks and L1 grow; every write reads back") {
  TempDir dir;
  const std::string path = dir / "tiny.qcow2";
  CreateOptions c;
  c.virtual_size = 64 << 10;  // one L1 cluster, a refcount table sized for 64 KiB
  c.cluster_size = kCluster;
  Model m;
  {
    auto img = Image::Create(path, c, Tiny());
    REQUIRE(img.ok());
    const uint64_t first_reftable = StateOf(**img).header.reftable_offset;
    // 16 MiB: 32768 data clusters, 512 L2 tables, 128+ refcount blocks;
    // the L1 table moves and the refcount table must grow several times.
    REQUIRE((*img)->Resize(16 << 20).ok());
    for (uint64_t off = 0; off < (16u << 20); off += 1 << 20) {
      auto d = Pattern(off, 1 << 20);
      Status st = (*img)->Write(off, d);
      REQUIRE_MESSAGE(st.ok(), st.message());
      m.Write(off, d);
    }
    CHECK(StateOf(**img).header.reftable_offset != first_reftable);
    CHECK(StateOf(**img).header.l1_size > 128);
    // Overwrite every other cluster of the first 4 MiB with the data at 8 MiB:
    // old clusters are freed, the new ones shared.
    for (uint64_t g = 0; g < 8192; g += 2) {
      std::vector<uint8_t> d(m.bytes.begin() + long((8 << 20) + g * kCluster),
                             m.bytes.begin() + long((8 << 20) + (g + 1) * kCluster));
      REQUIRE((*img)->Write(g * kCluster, d).ok());
      m.Write(g * kCluster, d);
    }
    CHECK((*img)->write_stats().freed_clusters >= 4096);
    CHECK((*img)->write_stats().dedup_hits >= 4096);
    CheckReadsAs(**img, m);
    REQUIRE((*img)->Close().ok());
  }
  CheckClean(path);
  auto img = Image::Open(path, Tiny());
  REQUIRE(img.ok());
  CheckReadsAs(**img, m);
}

TEST_CASE("a 4-table cache: many small writes, flushes between them, frees reused only after a flush") {
  TempDir dir;
  const std::string path = dir / "small.qcow2";
  CreateOptions c;
  c.virtual_size = 8 << 20;
  c.cluster_size = kCluster;
  Model m;
  std::mt19937_64 rng(7);
  {
    auto img = Image::Create(path, c, Tiny());
    REQUIRE(img.ok());
    for (int i = 0; i < 3000; ++i) {
      const uint64_t off = (rng() % ((8u << 20) - 3000)) & ~511ull;
      // One of 40 patterns (lots of sharing), at sizes that cut clusters.
      auto d = Pattern(rng() % 40, 300 + rng() % 2500);
      REQUIRE((*img)->Write(off, d).ok());
      m.Write(off, d);
      if (i % 500 == 0) REQUIRE((*img)->Flush().ok());
    }
    CheckReadsAs(**img, m);
    REQUIRE((*img)->Close().ok());
  }
  CheckClean(path);
  auto img = Image::Open(path, OpenOptions{});
  REQUIRE(img.ok());
  CheckReadsAs(**img, m);
}

TEST_CASE("an L2 table two L1 entries share is copied on write; both views stay right") {
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  TempDir dir;
  const std::string path = dir / "shared-l2.qcow2";
  CreateOptions c;
  c.virtual_size = 64 << 10;  // 512-byte clusters: an L2 table spans 32 KiB
  c.cluster_size = kCluster;
  Model m;
  {
    auto img = Image::Create(path, c, Tiny());
    REQUIRE(img.ok());
    auto d = Pattern(1, 32 << 10);
    REQUIRE((*img)->Write(0, d).ok());
    REQUIRE((*img)->Close().ok());
  }
  // Point L1 entry 1 at L2 table 0, and count the references that adds.
  {
    uint64_t l1_offset, table;
    {
      auto img = Image::Open(path, OpenOptions{});
      REQUIRE(img.ok());
      l1_offset = StateOf(**img).header.l1_offset;
      table = L1Offset(StateOf(**img).map->l1()[0]);
    }
    auto f = OpenPosixFile(path, OpenMode::kReadWrite);
    REQUIRE(f.ok());
    std::vector<uint8_t> e(8);
    StoreBe64(e.data(), table);  // no COPIED on either: the table is shared
    REQUIRE((*f)->WriteAt(l1_offset, e).ok());
    REQUIRE((*f)->WriteAt(l1_offset + 8, e).ok());
  }
  // qemu-img check -r all recounts: the table and its data now have refcount 2.
  REQUIRE(QemuImgCheck(path, "all").exit_code == 0);
  CheckQemuClean(path);
  auto d = Pattern(1, 32 << 10);
  m.Write(0, d);
  m.Write(32 << 10, d);
  {
    auto img = Image::Open(path, Tiny());
    REQUIRE_MESSAGE(img.ok(), img.status().message());
    CheckReadsAs(**img, m);
    auto fresh = Pattern(2, 3000);
    REQUIRE((*img)->Write((32 << 10) + 100, fresh).ok());
    m.Write((32 << 10) + 100, fresh);
    CheckReadsAs(**img, m);
    REQUIRE((*img)->Close().ok());
  }
  CheckClean(path);
  auto img = Image::Open(path, OpenOptions{});
  REQUIRE(img.ok());
  CheckReadsAs(**img, m);
  CHECK(L1Offset(StateOf(**img).map->l1()[0]) != L1Offset(StateOf(**img).map->l1()[1]));
}

TEST_CASE("freed clusters give their space back to the file system once their L2 change is on disk") {
  TempDir dir;
  const std::string path = dir / "punch.qcow2";
  CreateOptions c;
  c.virtual_size = 4 << 20;
  c.cluster_size = 65536;
  auto allocated = [&] {
    struct stat st;
    REQUIRE(::stat(path.c_str(), &st) == 0);
    return uint64_t(st.st_blocks) * 512;
  };
  Model m;
  auto img = Image::Create(path, c, OpenOptions{});
  REQUIRE(img.ok());
  auto d = Pattern(3, 4 << 20);
  REQUIRE((*img)->Write(0, d).ok());
  m.Write(0, d);
  REQUIRE((*img)->Flush().ok());
  const uint64_t before = allocated();
  CHECK(before >= (4u << 20));
  // The first 3 MiB become one cluster's data 48 times: 47 clusters freed.
  std::vector<uint8_t> same(3 << 20);
  for (size_t i = 0; i < same.size(); ++i) same[i] = uint8_t(i % 65536 * 7);
  REQUIRE((*img)->Write(0, same).ok());
  m.Write(0, same);
  CHECK((*img)->write_stats().freed_clusters == 48);
  // Not before the flush: until then the L2 tables on disk still point there.
  CHECK(allocated() >= before);
  REQUIRE((*img)->Flush().ok());
  CHECK(allocated() <= before - (46u << 16));
  CheckReadsAs(**img, m);
  REQUIRE((*img)->Close().ok());
  img.value().reset();
  CheckClean(path);
  auto again = Image::Open(path, OpenOptions{});
  REQUIRE(again.ok());
  CheckReadsAs(**again, m);
}

// Sessions over the stored index table: each one searches it in place,
// links to what earlier sessions stored, frees and stores anew, and grows
// the image past the table (refcount blocks and the refcount table placed
// around it at 512-byte clusters, where one block covers only 128 KiB).
// After every session the index is exact and in sync.
TEST_CASE("sessions over a stored index table: links, frees and growth keep it exact") {
  TempDir dir;
  const std::string path = dir / "sessions.qcow2";
  CreateOptions c;
  c.virtual_size = 8 << 20;
  c.cluster_size = kCluster;
  Model m;
  std::mt19937_64 rng(7);
  std::vector<std::vector<uint8_t>> pool;  // data earlier sessions stored
  for (int i = 0; i < 64; ++i) pool.push_back(Pattern(1000 + i, kCluster));
  std::map<std::string, int> holders;  // data -> guest clusters holding it
  for (const auto& d : pool) holders[std::string(d.begin(), d.end())] = 1;
  {
    auto img = Image::Create(path, c, Tiny());
    REQUIRE(img.ok());
    for (uint64_t g = 0; g < 64; ++g) {
      REQUIRE((*img)->Write(g * kCluster, pool[g]).ok());
      m.Write(g * kCluster, pool[g]);
    }
    REQUIRE((*img)->Close().ok());
  }
  for (int session = 0; session < 6; ++session) {
    CAPTURE(session);
    uint64_t table_before = 0;
    {
      auto img = Image::Open(path, Tiny());
      REQUIRE(img.ok());
      table_before = StateOf(**img).header.dedup->index_offset;
      CHECK(table_before != 0);
      uint64_t links = 0;
      for (int k = 0; k < 300; ++k) {
        const uint64_t g = 64 + rng() % 16000;  // most of them past the table
        const bool dup = rng() % 2 == 0;
        std::vector<uint8_t> d = dup ? pool[rng() % pool.size()] : Pattern(rng(), kCluster);
        if (!dup && pool.size() < 4000) pool.push_back(d);
        const std::string key(d.begin(), d.end());
        links += holders[key] > 0;  // stored somewhere now: linked, or the same again
        if (g * kCluster < m.bytes.size()) {
          const std::string old(m.bytes.begin() + long(g * kCluster), m.bytes.begin() + long((g + 1) * kCluster));
          if (holders.count(old)) --holders[old];
        }
        ++holders[key];
        REQUIRE((*img)->Write(g * kCluster, d).ok());
        m.Write(g * kCluster, d);
      }
      CHECK((*img)->write_stats().dedup_hits == links);
      CheckReadsAs(**img, m);
      REQUIRE((*img)->Close().ok());
    }
    CheckClean(path);
    CheckReport r = OurCheck(path);
    CHECK(r.dedup.in_sync);
    CHECK(r.dedup.index_loaded);
    CHECK(r.dedup.indexed == r.dedup.stored_clusters);
    auto img = Image::Open(path, {});
    REQUIRE(img.ok());
    CheckReadsAs(**img, m);
  }
}
