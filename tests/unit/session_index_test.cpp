// dedup/session_index: a write session's view of the index, the stored
// table with the session's changes over it, and how those changes go back.
#include "dedup/session_index.h"

#include <doctest/doctest.h>

#include <map>

#include "dedup/sha256.h"
#include "format/endian.h"
#include "support/numbered_digest.h"
#include "support/memory_file.h"

using namespace qcow2dedup;

namespace {

constexpr uint64_t kCs = 65536;

Digest D(uint64_t n) { return testing::NumberedDigest(n); }

Status AnyPlace(uint64_t, uint64_t) { return Status::Ok(); }

// Fresh tables go at this offset.
SessionIndex::Place At(uint64_t offset) {
  return [offset](uint64_t) -> Result<uint64_t> { return offset; };
}

// n entries D(i) -> 2 + i stored at 16 clusters, attached to a session.
struct Session {
  testing::MemoryFile file{std::vector<uint8_t>(16 * kCs)};
  DedupExtension ext;
  SessionIndex index;

  explicit Session(uint64_t n) {
    DedupIndex idx;
    for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), 2 + i);
    auto e = WriteIndexTable(file, idx, 16 * kCs);
    REQUIRE(e.ok());
    ext = *e;
    index.Attach(std::make_unique<IndexTable>(&file, ext));
  }
  std::optional<uint64_t> Find(uint64_t i) {
    auto r = index.Find(D(i));
    REQUIRE(r.ok());
    return *r;
  }
  // What the stored index holds after Store, read whole.
  std::map<Fingerprint, uint64_t> StoredContents(const DedupExtension& e) {
    Header h;
    h.cluster_bits = 16;
    h.dedup = e;
    h.autoclear = kAutoclearDedupInSync;
    DedupIndex back;
    auto r = ReadIndexTable(file, h, *file.Size(), back);
    REQUIRE(r.ok());
    REQUIRE(*r);
    std::map<Fingerprint, uint64_t> out;
    back.ForEach([&](Fingerprint k, uint64_t c) { out.emplace(k, c); });
    return out;
  }
};

Fingerprint K(uint64_t i) { return FingerprintOf(D(i)); }

}  // namespace

TEST_CASE("lookups see the table under the session's changes") {
  Session s(1000);
  CHECK(s.Find(10) == 12u);
  CHECK(s.index.size() == 1000);
  CHECK(s.index.MemoryBytes() == 0);  // nothing loaded

  REQUIRE(*s.index.Remove(D(10), 12));
  CHECK_FALSE(s.Find(10));
  CHECK_FALSE(*s.index.Remove(D(10), 12));  // once only
  CHECK_FALSE(*s.index.Remove(D(11), 99));  // not the pair stored
  CHECK(s.index.size() == 999);

  REQUIRE(s.index.Insert(D(5000), 700).ok());
  CHECK(s.Find(5000) == 700u);
  // A second copy added this session is the one named.
  REQUIRE(s.index.Insert(D(20), 800).ok());
  CHECK(s.Find(20) == 800u);
  CHECK(s.index.size() == 1001);
  // Re-adding what the table holds (or held, before a removal) adds nothing.
  REQUIRE(s.index.Insert(D(30), 32).ok());
  REQUIRE(s.index.Insert(D(10), 12).ok());
  CHECK(s.Find(10) == 12u);
  CHECK(s.index.size() == 1002);
}

TEST_CASE("Store writes the changes in place, and only those") {
  Session s(3000);
  const std::vector<uint8_t> before = s.file.bytes();
  REQUIRE(*s.index.Remove(D(7), 9));
  REQUIRE(s.index.Insert(D(9000), 5000).ok());
  auto r = s.index.Store(s.file, AnyPlace, At(1000 * kCs));
  REQUIRE(r.ok());
  REQUIRE(r->has_value());
  CHECK((*r)->index_offset == s.ext.index_offset);  // in place
  CHECK((*r)->index_buckets == s.ext.index_buckets);
  CHECK((*r)->index_entries == 3000);
  CHECK(s.file.bytes().size() == before.size());  // nothing written at the fresh offset
  auto stored = s.StoredContents(**r);
  CHECK(stored.size() == 3000);
  CHECK(stored.count(K(7)) == 0);
  CHECK(stored.at(K(9000)) == 5000);
  CHECK(stored.at(K(8)) == 10);
}

TEST_CASE("Store moves the index to a fresh table when the stored one is too full or its place is taken") {
  Session s(100);
  bool refuse = false;
  uint64_t extra = 0;
  SUBCASE("too full") { extra = s.ext.index_buckets * kIndexBucketEntries; }
  SUBCASE("a place in use") {
    refuse = true;
    extra = 1;
  }
  for (uint64_t i = 0; i < extra; ++i) REQUIRE(s.index.Insert(D(100000 + i), 3000 + i).ok());
  REQUIRE(*s.index.Remove(D(3), 5));
  auto r = s.index.Store(
      s.file, [&](uint64_t, uint64_t) { return refuse ? Status::Corruption("in use") : Status::Ok(); }, At(64 * kCs));
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  REQUIRE(r->has_value());
  CHECK((*r)->index_offset == 64 * kCs);
  CHECK((*r)->index_entries == 99 + extra);
  auto stored = s.StoredContents(**r);
  CHECK(stored.size() == 99 + extra);
  CHECK(stored.count(K(3)) == 0);
  CHECK(stored.at(K(4)) == 6);
  CHECK(stored.at(K(100000 + extra - 1)) == 3000 + extra - 1);
}

TEST_CASE("an index found inexact, or a damaged table, is not stored") {
  Session s(500);
  SUBCASE("inexact") { s.index.NoteInexact(); }
  SUBCASE("damaged") {
    const uint64_t b = HomeBucket(K(1), s.ext.index_buckets);
    std::vector<uint8_t> byte(1);
    REQUIRE(s.file.ReadAt(s.ext.index_offset + b * kIndexBucketBytes + 30, byte).ok());
    byte[0] ^= 4;
    REQUIRE(s.file.WriteAt(s.ext.index_offset + b * kIndexBucketBytes + 30, byte).ok());
    CHECK_FALSE(s.Find(1));
  }
  auto r = s.index.Store(s.file, AnyPlace, At(64 * kCs));
  REQUIRE(r.ok());
  CHECK_FALSE(r->has_value());
}

TEST_CASE("without a table everything is in memory and stored fresh") {
  testing::MemoryFile file{std::vector<uint8_t>(4 * kCs)};
  SessionIndex index;
  for (uint64_t i = 0; i < 400; ++i) REQUIRE(index.Insert(D(i), 2 + i).ok());
  REQUIRE(*index.Remove(D(0), 2));
  CHECK(index.size() == 399);
  CHECK(index.MemoryBytes() > 0);
  auto f = index.Find(D(9));
  REQUIRE(f.ok());
  CHECK(*f == 11u);
  auto r = index.Store(file, AnyPlace, At(4 * kCs));
  REQUIRE(r.ok());
  REQUIRE(r->has_value());
  CHECK((*r)->index_offset == 4 * kCs);
  CHECK((*r)->index_entries == 399);
}
