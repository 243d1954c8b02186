// dedup/index_table: the stored dedup index, a hash table of checked 4 KiB
// buckets searched in place; refused (not trusted, not an error) whenever
// the header does not vouch for it or it is not whole.
#include "dedup/index_table.h"

#include <doctest/doctest.h>

#include <map>
#include <set>

#include "dedup/sha256.h"
#include "format/endian.h"
#include "support/numbered_digest.h"
#include "support/memory_file.h"

using namespace qcow2dedup;

namespace {

constexpr uint64_t kCs = 65536;

Digest D(uint64_t n) { return testing::NumberedDigest(n); }

std::multimap<Fingerprint, uint64_t> Contents(const DedupIndex& idx) {
  std::multimap<Fingerprint, uint64_t> out;
  idx.ForEach([&](Fingerprint key, uint64_t c) { out.emplace(key, c); });
  return out;
}

// A file of `clusters` clusters with a table of idx stored at its end.
struct Stored {
  testing::MemoryFile file{std::vector<uint8_t>()};
  Header h;
  DedupIndex idx;

  explicit Stored(uint64_t n, uint64_t clusters = 8) {
    for (uint64_t i = 0; i < n; ++i) idx.Insert(D(i), 2 + i);
    REQUIRE(file.Truncate(clusters * kCs).ok());
    auto ext = WriteIndexTable(file, idx, clusters * kCs);
    REQUIRE(ext.ok());
    h.cluster_bits = 16;
    h.dedup = *ext;
    h.autoclear = kAutoclearDedupInSync;
  }
  uint64_t Size() { return *file.Size(); }
  Result<bool> Read(DedupIndex& out) { return ReadIndexTable(file, h, Size(), out); }
  IndexTable Table() { return IndexTable(&file, *h.dedup); }
};

void ExpectRefused(Stored& s) {
  DedupIndex out;
  out.Insert(D(999999), 3);  // whatever was there goes
  auto r = s.Read(out);
  REQUIRE_MESSAGE(r.ok(), "ReadIndexTable must refuse, not fail: ", r.status().message());
  CHECK_FALSE(*r);
  CHECK(out.size() == 0);
}

Status AnyPlace(uint64_t, uint64_t) { return Status::Ok(); }

}  // namespace

TEST_CASE("a bucket encodes and decodes; its check catches a flipped byte") {
  IndexBucket b;
  b.overflowed = true;
  for (uint64_t i = 0; i < kIndexBucketEntries; ++i) {
    IndexEntry e;
    e.fingerprint = FingerprintOf(D(i));
    e.cluster = uint32_t(i * 3 + 1);
    b.entries.push_back(e);
  }
  std::vector<uint8_t> raw(kIndexBucketBytes);
  EncodeIndexBucket(b, raw.data());
  IndexBucket back = DecodeIndexBucket(raw.data());
  REQUIRE(back.ok);
  CHECK(back.overflowed);
  REQUIRE(back.entries.size() == kIndexBucketEntries);
  CHECK(back.entries[kIndexBucketEntries - 1].cluster == (kIndexBucketEntries - 1) * 3 + 1);
  CHECK(back.entries[5].fingerprint == FingerprintOf(D(5)));
  for (size_t at : {size_t(0), size_t(2), size_t(9), size_t(100), size_t(4095)}) {
    CAPTURE(at);
    std::vector<uint8_t> bad = raw;
    bad[at] ^= 0x10;
    IndexBucket broken = DecodeIndexBucket(bad.data());
    CHECK_FALSE(broken.ok);
    CHECK(broken.entries.empty());
  }
  // An empty bucket is all zeros, and all zeros is an empty bucket.
  EncodeIndexBucket(IndexBucket{}, raw.data());
  CHECK(IsAllZero(raw));
  CHECK(DecodeIndexBucket(raw.data()).ok);
}

TEST_CASE("a written table reads back whole, and every key is found where it lies") {
  uint64_t n = 0;
  SUBCASE("one entry") { n = 1; }
  SUBCASE("one bucket") { n = 80; }
  SUBCASE("many buckets, several pieces") { n = 70000; }
  Stored s(n);
  CHECK(s.h.dedup->index_entries == n);
  CHECK(s.h.dedup->index_buckets == IndexBucketsFor(n));
  CHECK(s.Size() == 8 * kCs + IndexTableBytes(s.h.dedup->index_buckets));
  DedupIndex back;
  auto r = s.Read(back);
  REQUIRE(r.ok());
  REQUIRE(*r);
  CHECK(Contents(back) == Contents(s.idx));
  IndexTable t = s.Table();
  for (uint64_t i = 0; i < n; i += std::max<uint64_t>(1, n / 500)) {
    std::vector<uint64_t> found;
    REQUIRE(t.ForKey(FingerprintOf(D(i)), [&](uint64_t c) { found.push_back(c); return true; }).ok());
    CHECK(found == std::vector<uint64_t>{2 + i});
  }
  std::vector<uint64_t> none;
  REQUIRE(t.ForKey(FingerprintOf(D(n + 7)), [&](uint64_t c) { none.push_back(c); return true; }).ok());
  CHECK(none.empty());
}

TEST_CASE("keys crowding one bucket overflow into the next ones and are still found") {
  // Keys chosen so that all share a home bucket in a 4-bucket table.
  DedupIndex idx;
  std::vector<Digest> keys;
  for (uint64_t i = 0; keys.size() < 300; ++i)
    if (HomeBucket(FingerprintOf(D(i)), 4) == 2) keys.push_back(D(i));
  for (size_t i = 0; i < 200; ++i) idx.Insert(keys[i], 10 + i);
  testing::MemoryFile file{std::vector<uint8_t>()};
  auto ext = WriteIndexTable(file, idx, kCs);
  REQUIRE(ext.ok());
  CHECK(ext->index_buckets == IndexBucketsFor(200));
  IndexTable t(&file, *ext);
  for (size_t i = 0; i < 200; ++i) {
    uint64_t found = 0;
    REQUIRE(t.ForKey(FingerprintOf(keys[i]), [&](uint64_t c) { found = c; return false; }).ok());
    CHECK(found == 10 + i);
  }
  // In place: 100 more at the same home go on past the overflow.
  std::vector<IndexTable::Pair> added;
  for (size_t i = 200; i < 300; ++i) added.push_back({FingerprintOf(keys[i]), 10 + i});
  std::vector<IndexTable::Pair> removed{{FingerprintOf(keys[0]), 10}};
  Status st = t.Apply(removed, added, AnyPlace);
  if (ext->index_buckets * kIndexMaxLoad < 299) {
    CHECK(st.kind() == ErrorKind::kUnsupported);  // too full: the writer moves it
    return;
  }
  REQUIRE_MESSAGE(st.ok(), st.message());
  IndexTable again(&file, DedupExtension{ext->hash_algorithm, ext->index_offset, t.entries(), ext->index_buckets});
  CHECK(again.entries() == 299);
  for (size_t i = 1; i < 300; ++i) {
    uint64_t found = 0;
    REQUIRE(again.ForKey(FingerprintOf(keys[i]), [&](uint64_t c) { found = c; return false; }).ok());
    CHECK(found == 10 + i);
  }
  uint64_t gone = 0;
  REQUIRE(again.ForKey(FingerprintOf(keys[0]), [&](uint64_t c) { gone = c; return false; }).ok());
  CHECK(gone == 0);
}

TEST_CASE("Apply writes only the buckets it changes, each after may_write allows it") {
  Stored s(5000);
  IndexTable t = s.Table();
  const std::vector<uint8_t> before = s.file.bytes();
  std::set<uint64_t> vetted;
  auto vet = [&](uint64_t offset, uint64_t len) {
    CHECK(len == kIndexBucketBytes);
    vetted.insert(offset);
    return Status::Ok();
  };
  std::vector<IndexTable::Pair> added{{FingerprintOf(D(100000)), 9000}, {FingerprintOf(D(100001)), 9001}};
  std::vector<IndexTable::Pair> removed{{FingerprintOf(D(17)), 19}};
  REQUIRE(t.Apply(removed, added, vet).ok());
  CHECK(t.entries() == 5001);
  const std::vector<uint8_t>& after = s.file.bytes();
  REQUIRE(after.size() == before.size());
  std::set<uint64_t> changed;
  for (uint64_t at = 0; at < after.size(); at += kIndexBucketBytes)
    if (std::memcmp(&after[at], &before[at], kIndexBucketBytes) != 0) changed.insert(at);
  CHECK(!changed.empty());
  CHECK(changed.size() <= 3);
  for (uint64_t at : changed) CHECK(vetted.count(at));

  SUBCASE("a refused place writes nothing") {
    const std::vector<uint8_t> now = s.file.bytes();
    IndexTable t2(&s.file, DedupExtension{kHashSha256, s.h.dedup->index_offset, 5001, s.h.dedup->index_buckets});
    Status st = t2.Apply({}, {{FingerprintOf(D(200000)), 77}},
                         [](uint64_t, uint64_t) { return Status::Corruption("in use"); });
    CHECK(st.kind() == ErrorKind::kCorruption);
    CHECK(s.file.bytes() == now);
  }
}

TEST_CASE("a damaged bucket is noted and found empty; reading the whole table refuses it") {
  Stored s(2000);
  const uint64_t bucket = HomeBucket(FingerprintOf(D(5)), s.h.dedup->index_buckets);
  std::vector<uint8_t> b(1);
  REQUIRE(s.file.ReadAt(s.h.dedup->index_offset + bucket * kIndexBucketBytes + 40, b).ok());
  b[0] ^= 1;
  REQUIRE(s.file.WriteAt(s.h.dedup->index_offset + bucket * kIndexBucketBytes + 40, b).ok());
  IndexTable t = s.Table();
  bool found = false;
  REQUIRE(t.ForKey(FingerprintOf(D(5)), [&](uint64_t) { return found = true, false; }).ok());
  CHECK_FALSE(found);
  CHECK(t.damaged());
  ExpectRefused(s);
}

TEST_CASE("ReadIndexTable refuses what it cannot trust") {
  Stored s(3000);
  SUBCASE("truncated") {
    REQUIRE(s.file.Truncate(s.Size() - 1).ok());
    ExpectRefused(s);
  }
  SUBCASE("out of sync: the autoclear bit is clear") {
    s.h.autoclear = 0;
    ExpectRefused(s);
  }
  SUBCASE("the first index format") {
    s.h.dedup->version = 1;
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
  SUBCASE("fewer entries than the header says") {
    s.h.dedup->index_entries += 1;
    ExpectRefused(s);
  }
  SUBCASE("a bucket count that is not a power of two") {
    s.h.dedup->index_buckets += 1;
    ExpectRefused(s);
  }
  SUBCASE("more entries than the buckets hold") {
    s.h.dedup->index_entries = s.h.dedup->index_buckets * kIndexBucketEntries + 1;
    ExpectRefused(s);
  }
  SUBCASE("an unaligned or overflowing place") {
    s.h.dedup->index_offset += 512;
    ExpectRefused(s);
    s.h.dedup->index_offset = ~0ull & ~(kCs - 1);
    ExpectRefused(s);
    s.h.dedup->index_buckets = 1ull << 62;
    ExpectRefused(s);
  }
  SUBCASE("entries but no table") {
    s.h.dedup->index_offset = 0;
    ExpectRefused(s);
  }
}

TEST_CASE("an empty index is stored without a table") {
  testing::MemoryFile file{std::vector<uint8_t>(4 * kCs)};
  DedupIndex empty;
  auto ext = WriteIndexTable(file, empty, 4 * kCs);
  REQUIRE(ext.ok());
  CHECK(ext->index_offset == 0);
  CHECK(ext->index_entries == 0);
  CHECK(ext->index_buckets == 0);
  CHECK(*file.Size() == 4 * kCs);
  Header h;
  h.dedup = *ext;
  h.autoclear = kAutoclearDedupInSync;
  DedupIndex out;
  auto r = ReadIndexTable(file, h, 4 * kCs, out);
  REQUIRE(r.ok());
  CHECK(*r);
  CHECK(out.size() == 0);
}
