// dedup/index: the in-memory index of fingerprints.
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

// Every entry, checking on the way that ForEach visits them in order.
std::map<Fingerprint, uint64_t> Contents(const DedupIndex& idx) {
  std::map<Fingerprint, uint64_t> out;
  std::optional<std::pair<Fingerprint, uint64_t>> last;
  idx.ForEach([&](Fingerprint key, uint64_t cluster) {
    CHECK((!last || *last < std::pair(key, cluster)));
    last = std::pair(key, cluster);
    auto [it, fresh] = out.emplace(key, cluster);
    CHECK(fresh);  // each fingerprint once, in these tests
  });
  return out;
}

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
  SUBCASE("a second copy of a digest: Find names the highest; freeing either leaves the other") {
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
  SUBCASE("remove and insert cycles do not grow the index past a step a shard") {
    CHECK(idx.Remove(D(1), 5));
    idx.Insert(D(3), 7);
    const size_t mem = idx.MemoryBytes();
    for (uint64_t i = 4; i < 5000; ++i) {
      REQUIRE(idx.Remove(D(i - 1), i + 3));
      idx.Insert(D(i), i + 4);
    }
    // Never more than two entries at once: no shard grows past 4.
    CHECK(idx.MemoryBytes() <= mem + 256 * 4 * sizeof(uint64_t));
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

TEST_CASE("fingerprints are the first 40 bits of the digest") {
  DedupIndex idx;
  Digest a = D(1), b = a, c = a;
  b[5] ^= 1;  // differs past the fingerprint: the same fingerprint
  c[4] ^= 1;  // differs inside it
  CHECK(FingerprintOf(a) == FingerprintOf(b));
  CHECK(FingerprintOf(a) != FingerprintOf(c));
  CHECK(FingerprintOf(a) == LoadBe64(a.data()) >> 24);
  idx.Insert(a, 1);
  idx.Insert(c, 3);
  CHECK(idx.size() == 2);
  CHECK(idx.Find(b) == std::optional<uint64_t>(1));
  CHECK(idx.Find(c) == std::optional<uint64_t>(3));
  idx.Insert(b, 2);  // the same fingerprint: a second candidate
  CHECK(idx.size() == 3);
  CHECK(idx.Find(a) == std::optional<uint64_t>(2));
  CHECK(idx.FindAll(a) == std::vector<uint64_t>{2, 1});
  CHECK(idx.FindLowest(a) == std::optional<uint64_t>(1));
  CHECK(idx.Remove(a, 2));
  CHECK(idx.Find(b) == std::optional<uint64_t>(1));
}

TEST_CASE("many fingerprints in one shard, and many clusters under one fingerprint") {
  DedupIndex idx;
  std::vector<Digest> ds;
  for (int i = 0; i < 3000; ++i) {
    Digest d = D(0);  // the same first byte: one shard
    const uint32_t v = uint32_t(i) * 7919 + 1;
    for (int k = 0; k < 4; ++k) d[1 + k] = uint8_t(v >> (24 - 8 * k));
    ds.push_back(d);
    idx.Insert(d, uint64_t(i));
  }
  for (int i = 0; i < 50; ++i) idx.Insert(D(0), 10000 + uint64_t(i));
  CHECK(idx.size() == 3050);
  for (int i = 0; i < 3000; i += 3) CHECK(idx.Remove(ds[i], uint64_t(i)));
  for (int i = 0; i < 3000; ++i) {
    if (i % 3 == 0) CHECK_FALSE(idx.Find(ds[i]).has_value());
    else CHECK(idx.Find(ds[i]) == std::optional<uint64_t>(i));
  }
  const std::vector<uint64_t> all = idx.FindAll(D(0));
  REQUIRE(all.size() == 50);
  CHECK(all.front() == 10049);
  CHECK(all.back() == 10000);
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

TEST_CASE("many entries across shard splits, removals and reinsertions") {
  DedupIndex idx;
  const uint64_t n = 200000;
  for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), i + 1);
  CHECK(idx.size() == n);
  for (uint64_t i = 0; i < n; ++i) REQUIRE(idx.Find(D(i)) == std::optional<uint64_t>(i + 1));
  for (uint64_t i = 0; i < n; i += 2) REQUIRE(idx.Remove(D(i), i + 1));
  CHECK(idx.size() == n / 2);
  for (uint64_t i = n; i < n + n / 2; ++i) idx.Insert(D(i), i + 1);  // into freed room, then more splits
  for (uint64_t i = 0; i < n + n / 2; ++i) {
    const bool present = i >= n || i % 2 == 1;
    REQUIRE(idx.Find(D(i)) == (present ? std::optional<uint64_t>(i + 1) : std::nullopt));
  }
  auto all = Contents(idx);
  CHECK(all.size() == idx.size());
  CHECK(all.at(FingerprintOf(D(n + 5))) == n + 6);
}

// Issue 13's bound: 16 bytes a stored cluster for the whole index; the
// entries are 8, and growth in small steps a shard keeps the slack small at
// any size, not only just below a power of two.
TEST_CASE("memory: at most 10 bytes an entry, at 1M entries and just past a split") {
  for (const uint64_t n : {uint64_t(1000000), uint64_t(2048) * 512 + 1000}) {
    DedupIndex idx;
    for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), i);
    CHECK(idx.size() == n);
    const double per_entry = double(idx.MemoryBytes()) / double(n);
    MESSAGE("bytes per entry at ", n, ": ", per_entry);
    CHECK(per_entry <= 10.0);
    CHECK(idx.MemoryBytes() >= n * 8);  // the entries themselves are counted
  }
}

TEST_CASE("memory never passes the bound for the entries held, through splits and churn") {
  DedupIndex idx;
  std::mt19937_64 rng(5);
  std::vector<std::pair<Digest, uint64_t>> held;
  for (uint64_t i = 0; i < 700000; ++i) {
    // Grows, then shrinks by a third with removals spread at random, then
    // grows again: room given back where entries left.
    const bool remove = !held.empty() && ((i > 300000 && i < 450000) ? rng() % 3 != 0 : rng() % 4 == 0);
    if (remove) {
      const size_t k = rng() % held.size();
      REQUIRE(idx.Remove(held[k].first, held[k].second));
      held[k] = held.back();
      held.pop_back();
    } else {
      held.emplace_back(D(i), i + 1);
      idx.Insert(D(i), i + 1);
    }
    if (i % 1000 == 0) REQUIRE(idx.MemoryBytes() <= DedupIndex::BoundBytes(idx.size()));
  }
  CHECK(idx.size() == held.size());
  CHECK(idx.MemoryBytes() <= DedupIndex::BoundBytes(idx.size()));
  CHECK(DedupIndex::EntriesWithin(DedupIndex::BoundBytes(1000)) == 1000);
  while (!held.empty()) {
    REQUIRE(idx.Remove(held.back().first, held.back().second));
    held.pop_back();
  }
  CHECK(idx.MemoryBytes() == 0);
}

TEST_CASE("a moved index is whole, and the one it came from empty") {
  DedupIndex a;
  for (uint64_t i = 0; i < 5000; ++i) a.Insert(D(i), i + 1);
  DedupIndex b = std::move(a);
  CHECK(b.size() == 5000);
  CHECK(b.Find(D(42)) == std::optional<uint64_t>(43));
  CHECK(a.size() == 0);
  CHECK(a.MemoryBytes() == 0);
  a.Insert(D(1), 2);
  CHECK(a.Find(D(1)) == std::optional<uint64_t>(2));
}
