// dedup/index: the in-memory hash index.
#include "dedup/index.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "dedup/sha256.h"
#include "format/endian.h"
#include "support/numbered_digest.h"

using namespace qcow2dedup;

namespace {

Digest D(uint64_t n) { return testing::NumberedDigest(n); }

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
