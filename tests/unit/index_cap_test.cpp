// A cap on the dedup index's memory (OpenOptions::index_memory): the index
// bounds its bytes by its entries' count, a capped session never holds more, what does
// not fit is stored but not indexed (counted, never linked wrongly), and an
// image written so is clean, reads back right and says how much was missed.
#include <doctest/doctest.h>

#include <fstream>
#include <map>
#include <random>
#include <string>

#include "dedup/index.h"
#include "dedup/session_index.h"
#include "image/image_state.h"
#include "image/writer.h"
#include "qcow2dedup/dedup.h"
#include "support/check_helpers.h"
#include "support/image_helpers.h"
#include "support/memory_file.h"
#include "support/numbered_digest.h"
#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using namespace testing;

namespace {

Digest D(uint64_t n) { return NumberedDigest(n); }

// How many pairs a session index holds under cap bytes: those whose bound
// fits, whatever their fingerprints.
uint64_t EntriesUnder(uint64_t cap) { return DedupIndex::EntriesWithin(cap); }

}  // namespace

TEST_CASE("the bound is tight enough to use and never below what the index takes") {
  for (uint64_t cap : {uint64_t(64) << 10, uint64_t(1) << 20, uint64_t(64) << 20}) {
    const uint64_t n = EntriesUnder(cap);
    CHECK(DedupIndex::BoundBytes(n) <= cap);
    CHECK(DedupIndex::BoundBytes(n + 1) > cap);
    // Room for most of what the cap could hold, past the fixed shard table.
    CHECK(double(cap - DedupIndex::BoundBytes(1) + 8) / double(n) < 11.5);
    DedupIndex idx;
    for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), i + 1);
    CHECK(idx.MemoryBytes() <= cap);
  }
}

TEST_CASE("a capped session index never holds more than its cap, and counts what it left out") {
  const uint64_t cap = 200 * 1024;
  const uint64_t fits = EntriesUnder(cap);
  REQUIRE(fits > 0);
  SessionIndex index;
  index.set_memory_cap(cap);
  const uint64_t n = fits + 1000;
  uint64_t held = 0;
  for (uint64_t i = 0; i < n; ++i) {
    auto r = index.Insert(D(i), i + 1);
    REQUIRE(r.ok());
    held += *r;
    REQUIRE(index.MemoryBytes() <= cap);
  }
  CHECK(held == fits);
  CHECK(index.refused() == n - fits);
  CHECK(index.size() == fits);
  // What was left out is simply not found; what was kept is.
  for (uint64_t i = 0; i < n; ++i) {
    auto f = index.Find(D(i));
    REQUIRE(f.ok());
    REQUIRE(*f == (i < fits ? std::optional<uint64_t>(i + 1) : std::nullopt));
  }
  // Freed slots are reused within the cap.
  for (uint64_t i = 0; i < 10; ++i) REQUIRE(*index.Remove(D(i), i + 1));
  for (uint64_t i = 0; i < 10; ++i) REQUIRE(*index.Insert(D(n + i), n + i + 1));
  CHECK(index.MemoryBytes() <= cap);
  // An inexact index is not stored: the next session rebuilds it.
  MemoryFile file{std::vector<uint8_t>(1 << 20)};
  auto stored = index.Store(
      file, [](uint64_t, uint64_t) { return Status::Ok(); }, [](uint64_t) -> Result<uint64_t> { return 65536; });
  REQUIRE(stored.ok());
  CHECK(!stored->has_value());
}

TEST_CASE("no cap: nothing is refused") {
  SessionIndex index;
  for (uint64_t i = 0; i < 10000; ++i) REQUIRE(*index.Insert(D(i), i + 1));
  CHECK(index.refused() == 0);
  CHECK(index.size() == 10000);
}

// The write path under a cap: each distinct cluster written twice in a row.
// The first fits entries are indexed, so their second copies link; every
// later one is stored twice, and each copy stored past the cap is counted.
TEST_CASE("writes under index_memory: the cap holds, data reads back, the misses are counted and stored") {
  constexpr uint64_t kCs = 4096;
  const uint64_t cap = 120 * 1024;
  const uint64_t fits = EntriesUnder(cap);
  const uint64_t distinct = fits + 700;
  TempDir dir;
  const std::string path = dir / "capped.qcow2";
  CreateOptions co;
  co.virtual_size = 2 * distinct * kCs;
  co.cluster_size = kCs;
  OpenOptions oo;
  oo.writable = true;
  oo.index_memory = cap;
  std::vector<uint8_t> want(co.virtual_size);
  {
    auto img = Image::Create(path, co, std::move(oo));
    REQUIRE_MESSAGE(img.ok(), img.status().message());
    const Writer& w = *StateOf(**img).writer;
    for (uint64_t i = 0; i < distinct; ++i) {
      const std::vector<uint8_t> c = RandomBytes(kCs, i);
      std::vector<uint8_t> two(c);
      two.insert(two.end(), c.begin(), c.end());
      REQUIRE((*img)->Write(2 * i * kCs, two).ok());
      std::copy(two.begin(), two.end(), want.begin() + long(2 * i * kCs));
      REQUIRE(w.index().MemoryBytes() <= cap);
    }
    const WriteStats& st = (*img)->write_stats();
    CHECK(st.new_clusters == fits + 2 * (distinct - fits));
    CHECK(st.dedup_hits == fits);
    CHECK(st.unindexed_clusters == st.new_clusters - fits);
    REQUIRE((*img)->Close().ok());
  }
  CheckReport r = OurCheck(path);
  CHECK_MESSAGE(r.corruptions == 0, Messages(r));
  CHECK(r.leaks == 0);
  CHECK(r.dedup.errors() == 0);
  CHECK(!r.dedup.in_sync);  // not stored: the next session rebuilds it
  CHECK(r.dedup.duplicates == distinct - fits);  // the stored-again copies
  CHECK(r.dedup.memory_misses == 2 * (distinct - fits));
  CHECK(r.dedup.memory_misses >= r.dedup.duplicates);
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  CheckQemuClean(path);
  {
    auto img = Image::Open(path, OpenOptions{});
    REQUIRE(img.ok());
    std::vector<uint8_t> got(want.size());
    REQUIRE((*img)->Read(0, got).ok());
    CHECK(got == want);
  }
  // dedup with room for everything links every duplicate: nothing missed remains.
  DedupOptions d;
  auto done = DeduplicateImage(path, std::move(d));
  REQUIRE_MESSAGE(done.ok(), done.status().message());
  CHECK(done->unindexed == 0);
  CHECK(done->stored_after == distinct);
  r = OurCheck(path);
  CHECK(r.dedup.duplicates == 0);
  CHECK(r.dedup.memory_misses == 0);
  CheckQemuClean(path);
}

TEST_CASE("dedup under index_memory: only what the index holds is linked; what it left out is counted") {
  constexpr uint64_t kCs = 4096;
  const uint64_t cap = 120 * 1024;
  const uint64_t fits = EntriesUnder(cap);
  const uint64_t distinct = fits + 500;
  TempDir dir;
  const std::string raw = dir / "pairs.raw", path = dir / "q.qcow2";
  {
    std::string bytes;
    for (uint64_t i = 0; i < distinct; ++i) {
      const std::vector<uint8_t> c = RandomBytes(kCs, i);
      bytes.append(c.begin(), c.end());
      bytes.append(c.begin(), c.end());
    }
    std::ofstream(raw, std::ios::binary) << bytes;
  }
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  REQUIRE(Run("qemu-img convert -f raw -O qcow2 -o cluster_size=4096 " + Sh(raw) + " " + Sh(path)).exit_code == 0);
  DedupOptions d;
  d.index_memory = cap;
  auto done = DeduplicateImage(path, std::move(d));
  REQUIRE_MESSAGE(done.ok(), done.status().message());
  // qemu-img stores the clusters in guest order: the index holds the first
  // fits of them, fits / 2 pairs, and links those.
  CHECK(done->stored_before == 2 * distinct);
  CHECK(done->unindexed == 2 * distinct - fits);
  CHECK(done->relinked == fits / 2);
  CHECK(done->stored_after == 2 * distinct - fits / 2);
  CheckReport r = OurCheck(path);
  CHECK_MESSAGE(r.corruptions == 0, Messages(r));
  CHECK(r.leaks == 0);
  CHECK(r.dedup.memory_misses == done->unindexed);
  CHECK(r.dedup.duplicates == distinct - fits / 2);
  CHECK(r.dedup.memory_misses >= r.dedup.duplicates);
  CheckQemuClean(path);
  CheckQemuIdentical(path, raw);
}
