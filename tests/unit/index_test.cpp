// dedup/index and dedup/index_store: the in-memory hash index and its
// on-disk form, which must be refused (not trusted, not an error) whenever
// the header does not vouch for it or it is not whole.
#include "dedup/index.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "dedup/index_store.h"
#include "dedup/sha256.h"
#include "format/endian.h"
#include "support/memory_file.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::TempDir;

namespace {

// The bytes SaveIndex writes for idx.
std::vector<uint8_t> EncodeIndex(const DedupIndex& idx, uint32_t bits) {
  testing::MemoryFile f({});
  REQUIRE(SaveIndex(f, idx, bits, 0).ok());
  return f.bytes();
}

Digest D(uint64_t n) {
  uint8_t b[8];
  StoreBe64(b, n);
  return Sha256(b);
}

std::map<std::vector<uint8_t>, uint64_t> Contents(const DedupIndex& idx) {
  std::map<std::vector<uint8_t>, uint64_t> out;
  idx.ForEach([&](const uint8_t* key, uint64_t cluster) {
    auto [it, fresh] = out.emplace(std::vector<uint8_t>(key, key + DedupIndex::kKeyBytes), cluster);
    CHECK(fresh);  // each key once
  });
  return out;
}

std::vector<uint8_t> Key(const Digest& d) { return std::vector<uint8_t>(d.begin(), d.begin() + DedupIndex::kKeyBytes); }

}  // namespace

TEST_CASE("Insert, Find, Remove") {
  DedupIndex idx;
  CHECK(idx.size() == 0);
  CHECK_FALSE(idx.Find(D(1)).has_value());
  CHECK_FALSE(idx.Remove(D(1), 5));
  idx.Insert(D(1), 5);
  idx.Insert(D(2), 6);
  CHECK(idx.size() == 2);
  CHECK(idx.Find(D(1)) == std::optional<uint64_t>(5));
  CHECK(idx.Find(D(2)) == std::optional<uint64_t>(6));
  CHECK_FALSE(idx.Find(D(3)).has_value());

  SUBCASE("Remove only with the cluster it maps to") {
    CHECK_FALSE(idx.Remove(D(1), 6));
    CHECK(idx.Find(D(1)) == std::optional<uint64_t>(5));
    CHECK(idx.Remove(D(1), 5));
    CHECK_FALSE(idx.Find(D(1)).has_value());
    CHECK_FALSE(idx.Remove(D(1), 5));
    CHECK(idx.size() == 1);
    CHECK(idx.Find(D(2)) == std::optional<uint64_t>(6));
  }
  SUBCASE("a second copy of a digest: Find names the newest; freeing either leaves the other") {
    idx.Insert(D(1), 9);
    idx.Insert(D(1), 9);  // the same pair again: no new entry
    CHECK(idx.size() == 3);
    CHECK(idx.Find(D(1)) == std::optional<uint64_t>(9));
    CHECK(idx.Remove(D(1), 9));
    CHECK(idx.Find(D(1)) == std::optional<uint64_t>(5));
    idx.Insert(D(1), 9);
    CHECK(idx.Remove(D(1), 5));
    CHECK(idx.Find(D(1)) == std::optional<uint64_t>(9));
    CHECK_FALSE(idx.Remove(D(1), 5));
    CHECK(idx.Remove(D(1), 9));
    CHECK_FALSE(idx.Find(D(1)).has_value());
  }
  SUBCASE("removed slots are reused: remove and insert cycles do not grow the index") {
    CHECK(idx.Remove(D(1), 5));
    idx.Insert(D(3), 7);
    const size_t mem = idx.MemoryBytes();
    for (uint64_t i = 4; i < 5000; ++i) {
      REQUIRE(idx.Remove(D(i - 1), i + 3));
      idx.Insert(D(i), i + 4);
    }
    CHECK(idx.MemoryBytes() == mem);
    CHECK(idx.size() == 2);
    CHECK(idx.Find(D(4999)) == std::optional<uint64_t>(5003));
    CHECK(idx.Find(D(2)) == std::optional<uint64_t>(6));
  }
  SUBCASE("Clear forgets everything and gives the memory back") {
    idx.Clear();
    CHECK(idx.size() == 0);
    CHECK_FALSE(idx.Find(D(1)).has_value());
    CHECK(idx.MemoryBytes() == 0);
    idx.Insert(D(1), 1);
    CHECK(idx.Find(D(1)) == std::optional<uint64_t>(1));
  }
}

TEST_CASE("keys are the first 160 bits; the bucket the first 64") {
  DedupIndex idx;
  Digest a = D(1), b = a, c = a;
  b[31] ^= 1;  // differs past the key: the same key
  c[15] ^= 1;  // differs inside the key, same bucket
  idx.Insert(a, 1);
  idx.Insert(c, 3);
  CHECK(idx.size() == 2);
  CHECK(idx.Find(b) == std::optional<uint64_t>(1));
  CHECK(idx.Find(c) == std::optional<uint64_t>(3));
  idx.Insert(b, 2);  // the same key: a second copy
  CHECK(idx.size() == 3);
  CHECK(idx.Find(a) == std::optional<uint64_t>(2));
  CHECK(idx.Remove(a, 2));
  CHECK(idx.Find(b) == std::optional<uint64_t>(1));
}

TEST_CASE("a long chain in one bucket") {
  DedupIndex idx;
  std::vector<Digest> ds;
  for (int i = 0; i < 3000; ++i) {
    Digest d = D(0);  // same first 8 bytes: one bucket at any table size
    StoreBe64(d.data() + 8, uint64_t(i) * 7919);
    ds.push_back(d);
    idx.Insert(d, uint64_t(i));
  }
  CHECK(idx.size() == 3000);
  for (int i = 0; i < 3000; i += 3) CHECK(idx.Remove(ds[i], uint64_t(i)));
  for (int i = 0; i < 3000; ++i) {
    if (i % 3 == 0) CHECK_FALSE(idx.Find(ds[i]).has_value());
    else CHECK(idx.Find(ds[i]) == std::optional<uint64_t>(i));
  }
}

TEST_CASE("clusters beyond what the index holds are not indexed") {
  DedupIndex idx;
  idx.Insert(D(1), DedupIndex::kMaxCluster);
  CHECK(idx.Find(D(1)) == std::optional<uint64_t>(DedupIndex::kMaxCluster));
  idx.Insert(D(2), DedupIndex::kMaxCluster + 1);
  idx.Insert(D(3), 1ull << 40);
  CHECK_FALSE(idx.Find(D(2)).has_value());
  CHECK_FALSE(idx.Find(D(3)).has_value());
  CHECK(idx.size() == 1);
  // An unindexable cluster must not leave a wrong mapping.
  idx.Insert(D(1), 1ull << 33);
  auto f = idx.Find(D(1));
  CHECK((!f.has_value() || *f == DedupIndex::kMaxCluster));
  CHECK(f != std::optional<uint64_t>(uint64_t(uint32_t(1ull << 33))));
}

TEST_CASE("RemoveCluster forgets every digest that maps to a cluster") {
  DedupIndex idx;
  for (uint64_t i = 0; i < 100; ++i) idx.Insert(D(i), i % 10);
  idx.RemoveCluster(3);
  CHECK(idx.size() == 90);
  for (uint64_t i = 0; i < 100; ++i) {
    if (i % 10 == 3) CHECK_FALSE(idx.Find(D(i)).has_value());
    else CHECK(idx.Find(D(i)) == std::optional<uint64_t>(i % 10));
  }
  idx.RemoveCluster(77);  // none
  CHECK(idx.size() == 90);
}

TEST_CASE("many entries across rehashes, removals and reinsertions") {
  DedupIndex idx;
  const uint64_t n = 200000;
  for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), i + 1);
  CHECK(idx.size() == n);
  for (uint64_t i = 0; i < n; ++i) REQUIRE(idx.Find(D(i)) == std::optional<uint64_t>(i + 1));
  for (uint64_t i = 0; i < n; i += 2) REQUIRE(idx.Remove(D(i), i + 1));
  CHECK(idx.size() == n / 2);
  for (uint64_t i = n; i < n + n / 2; ++i) idx.Insert(D(i), i + 1);  // into freed slots, then more rehashing
  for (uint64_t i = 0; i < n + n / 2; ++i) {
    const bool present = i >= n || i % 2 == 1;
    REQUIRE(idx.Find(D(i)) == (present ? std::optional<uint64_t>(i + 1) : std::nullopt));
  }
  auto all = Contents(idx);
  CHECK(all.size() == idx.size());
  CHECK(all.at(Key(D(n + 5))) == n + 6);
}

TEST_CASE("memory: at most 40 bytes an entry at 1M entries") {
  DedupIndex idx;
  const uint64_t n = 1000000;
  for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), i);
  CHECK(idx.size() == n);
  const double per_entry = double(idx.MemoryBytes()) / double(n);
  MESSAGE("bytes per entry at 1M: ", per_entry);
  CHECK(per_entry <= 40.0);
  CHECK(idx.MemoryBytes() >= n * 28);  // the entries themselves are counted
}

// The header's promise (28 bytes an entry plus 4 to 8 of buckets) should
// hold at any size, not only just below a power of two: a vector that
// doubles holds up to twice the entries it needs right after it grows.
TEST_CASE("memory: at most 40 bytes an entry just past a power of two") {
  DedupIndex idx;
  const uint64_t n = (1u << 20) + 1000;
  for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), i);
  const double per_entry = double(idx.MemoryBytes()) / double(n);
  MESSAGE("bytes per entry at 2^20 + 1000: ", per_entry);
  CHECK(per_entry <= 40.0);
}

// ---------------------------------------------------------------------------
// On disk.

namespace {

constexpr uint32_t kBits = 16;
constexpr uint64_t kCs = 1u << kBits;

struct Stored {
  TempDir dir;
  std::unique_ptr<File> file;
  Header h;
  DedupIndex idx;
  uint64_t offset = 0;
  std::vector<uint8_t> bytes;

  explicit Stored(uint64_t n) {
    auto f = OpenPosixFile(dir / "img", OpenMode::kCreate);
    REQUIRE(f.ok());
    file = std::move(f).value();
    for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), 2 + (i * 7919) % (n + 5));  // clusters 2..n+6, unordered
    offset = (n + 8) * kCs;
    REQUIRE(file->Truncate(offset).ok());
    auto ext = SaveIndex(*file, idx, kBits, offset);
    REQUIRE(ext.ok());
    h.cluster_bits = kBits;
    h.dedup = *ext;
    h.autoclear = kAutoclearDedupInSync;
    bytes = EncodeIndex(idx, kBits);
  }
  uint64_t FileSize() { return *file->Size(); }
  Result<bool> Load(DedupIndex& out) { return LoadIndex(*file, h, FileSize(), out); }
  // Rewrites the stored bytes and the digest that vouches for them.
  void Restore(const std::vector<uint8_t>& b) {
    REQUIRE(file->WriteAt(offset, b).ok());
    h.dedup->index_digest = Sha256(b);
    h.dedup->index_entries = b.size() / kIndexEntryBytes;
  }
};

void ExpectRefused(Stored& s) {
  DedupIndex out;
  out.Insert(D(999999), 3);  // whatever was there goes
  auto r = s.Load(out);
  REQUIRE_MESSAGE(r.ok(), "LoadIndex must refuse, not fail: ", r.status().message());
  CHECK_FALSE(*r);
  CHECK(out.size() == 0);
}

}  // namespace

TEST_CASE("EncodeIndex: 32-byte entries sorted by host offset") {
  DedupIndex idx;
  idx.Insert(D(1), 9);
  idx.Insert(D(2), 3);
  idx.Insert(D(3), 5);
  const auto b = EncodeIndex(idx, kBits);
  REQUIRE(b.size() == 3 * kIndexEntryBytes);
  const uint64_t clusters[] = {3, 5, 9};
  const uint64_t digests[] = {2, 3, 1};
  for (int i = 0; i < 3; ++i) {
    const uint8_t* p = &b[i * kIndexEntryBytes];
    CHECK(LoadBe64(p) == clusters[i] << kBits);
    const Digest d = D(digests[i]);
    CHECK(std::equal(p + 8, p + 28, d.begin()));
    CHECK(std::all_of(p + 28, p + 32, [](uint8_t c) { return c == 0; }));
  }
}

TEST_CASE("SaveIndex and LoadIndex round trip") {
  uint64_t n = 0;
  SUBCASE("in one piece") { n = 5000; }
  SUBCASE("in several pieces") { n = 70000; }  // SaveIndex and LoadIndex move 32768 entries at a time
  CAPTURE(n);
  Stored s(n);
  CHECK(s.h.dedup->index_offset == s.offset);
  CHECK(s.h.dedup->index_entries == n);
  CHECK(s.h.dedup->hash_algorithm == kHashSha256);
  CHECK(s.FileSize() == s.offset + n * kIndexEntryBytes);
  std::vector<uint8_t> on_disk(s.bytes.size());
  REQUIRE(s.file->ReadAt(s.offset, on_disk).ok());
  CHECK(on_disk == s.bytes);
  CHECK(s.h.dedup->index_digest == Sha256(s.bytes));
  DedupIndex out;
  auto r = s.Load(out);
  REQUIRE(r.ok());
  CHECK(*r);
  CHECK(Contents(out) == Contents(s.idx));
  CHECK(out.Find(D(17)) == s.idx.Find(D(17)));
}

TEST_CASE("an empty index round trips without a location") {
  TempDir dir;
  auto f = OpenPosixFile(dir / "img", OpenMode::kCreate);
  REQUIRE(f.ok());
  REQUIRE((*f)->Truncate(4 * kCs).ok());
  DedupIndex empty;
  auto ext = SaveIndex(**f, empty, kBits, 4 * kCs);
  REQUIRE(ext.ok());
  CHECK(ext->index_offset == 0);
  CHECK(ext->index_entries == 0);
  CHECK(*(*f)->Size() == 4 * kCs);  // nothing written
  Header h;
  h.cluster_bits = kBits;
  h.dedup = *ext;
  h.autoclear = kAutoclearDedupInSync;
  DedupIndex out;
  out.Insert(D(1), 2);
  auto r = LoadIndex(**f, h, 4 * kCs, out);
  REQUIRE(r.ok());
  CHECK(*r);
  CHECK(out.size() == 0);
}

TEST_CASE("LoadIndex refuses what it cannot trust") {
  Stored s(300);
  SUBCASE("truncated") {
    REQUIRE(s.file->Truncate(s.FileSize() - 1).ok());
    ExpectRefused(s);
  }
  SUBCASE("truncated to its start") {
    REQUIRE(s.file->Truncate(s.offset).ok());
    ExpectRefused(s);
  }
  SUBCASE("a wrong digest in the header") {
    s.h.dedup->index_digest[7] ^= 0x40;
    ExpectRefused(s);
  }
  SUBCASE("a flipped byte in the stored index") {
    auto b = s.bytes;
    b[100] ^= 1;
    REQUIRE(s.file->WriteAt(s.offset, b).ok());
    ExpectRefused(s);
  }
  SUBCASE("an entry pointing at the index itself or past it (with a good digest)") {
    auto b = s.bytes;
    StoreBe64(&b[b.size() - kIndexEntryBytes], s.offset);
    s.Restore(b);
    ExpectRefused(s);
    StoreBe64(&b[b.size() - kIndexEntryBytes], s.offset + 1000 * kCs);
    s.Restore(b);
    ExpectRefused(s);
  }
  SUBCASE("an entry pointing at the header or between clusters") {
    auto b = s.bytes;
    StoreBe64(&b[0], 0);
    s.Restore(b);
    ExpectRefused(s);
    StoreBe64(&b[0], 3 * kCs + 512);
    s.Restore(b);
    ExpectRefused(s);
  }
  SUBCASE("the good digest of a shorter index than the header says") {
    s.h.dedup->index_digest = Sha256(std::span(s.bytes).first(s.bytes.size() - kIndexEntryBytes));
    ExpectRefused(s);
  }
  SUBCASE("more entries than the file can hold") {
    s.h.dedup->index_entries = 1ull << 60;
    ExpectRefused(s);
    s.h.dedup->index_entries = ~0ull;
    ExpectRefused(s);
  }
  SUBCASE("misplaced index") {
    s.h.dedup->index_offset = s.offset + 512;
    ExpectRefused(s);
    s.h.dedup->index_offset = 0;
    ExpectRefused(s);
    s.h.dedup->index_offset = ~0ull & ~(kCs - 1);
    ExpectRefused(s);
  }
  SUBCASE("out of sync: the autoclear bit is clear") {
    s.h.autoclear = 0;
    ExpectRefused(s);
  }
  SUBCASE("no dedup extension") {
    s.h.dedup.reset();
    ExpectRefused(s);
  }
  SUBCASE("another hash algorithm") {
    s.h.dedup->hash_algorithm = 2;
    ExpectRefused(s);
  }
  SUBCASE("no entries but an offset") {
    s.h.dedup->index_entries = 0;
    ExpectRefused(s);
  }
}
