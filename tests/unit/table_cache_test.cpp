// image/table_cache: hits and misses, LRU eviction of clean tables only,
// write-back in offset order, growth past capacity (never a write-back of its
// own), and the check_write veto.
#include "image/table_cache.h"

#include <doctest/doctest.h>

#include <cstring>
#include <map>

using namespace qcow2dedup;

namespace {

constexpr uint64_t kTable = 4096;

// An in-memory File that logs every read and write.
class CountingFile final : public File {
 public:
  std::vector<uint8_t> bytes = std::vector<uint8_t>(1 << 20);
  std::vector<uint64_t> read_log, write_log;
  std::map<uint64_t, Status> fail_read, fail_write;

  Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override {
    read_log.push_back(offset);
    if (auto it = fail_read.find(offset); it != fail_read.end()) return it->second;
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = offset + i < bytes.size() ? bytes[offset + i] : 0;
    return Status::Ok();
  }
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    write_log.push_back(offset);
    if (auto it = fail_write.find(offset); it != fail_write.end()) return it->second;
    if (offset + data.size() > bytes.size()) bytes.resize(offset + data.size());
    std::memcpy(bytes.data() + offset, data.data(), data.size());
    return Status::Ok();
  }
  Status Sync() override { return Status::Ok(); }
  Result<uint64_t> Size() override { return uint64_t(bytes.size()); }
  Status Truncate(uint64_t size) override {
    bytes.resize(size);
    return Status::Ok();
  }
  Status Lock(LockMode) override { return Status::Ok(); }
  const std::string& name() const override { return name_; }

  size_t reads_of(uint64_t off) const { return size_t(std::count(read_log.begin(), read_log.end(), off)); }
  size_t writes_of(uint64_t off) const { return size_t(std::count(write_log.begin(), write_log.end(), off)); }

 private:
  std::string name_ = "counting";
};

uint64_t T(int i) { return uint64_t(i) * kTable; }

struct Fixture {
  CountingFile file;
  std::vector<uint64_t> checked;
  std::map<uint64_t, Status> veto;
  TableCache cache{&file, kTable, 4, [this](uint64_t off) {
                     checked.push_back(off);
                     auto it = veto.find(off);
                     return it == veto.end() ? Status::Ok() : it->second;
                   }};
  Fixture() {
    // Table i holds the byte i + 1 everywhere.
    for (int i = 0; i < 64; ++i) std::fill(file.bytes.begin() + T(i), file.bytes.begin() + T(i + 1), uint8_t(i + 1));
  }
  TableCache::Table* Get(int i) {
    auto r = cache.Get(T(i));
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    return *r;
  }
  void Dirty(int i, uint8_t v) {
    TableCache::Table* t = Get(i);
    std::fill(t->begin(), t->end(), v);
    cache.MarkDirty(T(i));
  }
};

}  // namespace

TEST_CASE("a miss reads the table from the file, a hit does not") {
  Fixture f;
  TableCache::Table* t = f.Get(3);
  REQUIRE(t->size() == kTable);
  CHECK((*t)[0] == 4);
  CHECK((*t)[kTable - 1] == 4);
  CHECK(f.file.read_log == std::vector<uint64_t>{T(3)});
  TableCache::Table* again = f.Get(3);
  CHECK(again == t);
  CHECK(f.file.read_log.size() == 1);
  CHECK_FALSE(f.cache.HasDirty());
}

TEST_CASE("Create gives a zero table without reading, and zeroes a cached one") {
  Fixture f;
  auto c = f.cache.Create(T(5));
  REQUIRE(c.ok());
  CHECK(std::all_of((*c)->begin(), (*c)->end(), [](uint8_t b) { return b == 0; }));
  CHECK(f.file.read_log.empty());
  // Get now hits the created table, not the file's bytes.
  CHECK((*f.Get(5))[0] == 0);
  CHECK(f.file.read_log.empty());
  TableCache::Table* t = f.Get(6);
  CHECK((*t)[0] == 7);
  auto z = f.cache.Create(T(6));
  REQUIRE(z.ok());
  CHECK(*z == t);
  CHECK((*t)[0] == 0);
  CHECK((*t)[kTable - 1] == 0);
}

TEST_CASE("the least recently used clean table is evicted") {
  Fixture f;
  for (int i = 0; i < 4; ++i) f.Get(i);  // capacity 4: 0 1 2 3
  f.Get(0);                               // 0 is now the most recent; 1 the least
  f.Get(4);                               // evicts 1
  CHECK(f.file.reads_of(T(1)) == 1);
  f.Get(0);
  f.Get(2);
  f.Get(3);
  f.Get(4);
  CHECK(f.file.read_log.size() == 5);  // all hits
  f.Get(1);                            // a miss again: evicts 0 (least recent now)
  CHECK(f.file.reads_of(T(1)) == 2);
  f.Get(2);
  CHECK(f.file.reads_of(T(2)) == 1);
  f.Get(0);
  CHECK(f.file.reads_of(T(0)) == 2);
  CHECK(f.file.write_log.empty());  // clean tables are dropped, never written
}

TEST_CASE("dirty tables are never evicted, and keep their changes") {
  Fixture f;
  f.Dirty(0, 0xd0);
  for (int i = 1; i < 20; ++i) f.Get(i);
  CHECK(f.file.write_log.empty());
  TableCache::Table* t = f.Get(0);
  CHECK((*t)[0] == 0xd0);
  CHECK(f.file.reads_of(T(0)) == 1);
  CHECK(f.cache.HasDirty());
}

TEST_CASE("WriteBack writes dirty tables in offset order, once, and only them") {
  Fixture f;
  f.Dirty(3, 0x33);
  f.Dirty(1, 0x11);
  f.Get(0);
  f.Dirty(2, 0x22);
  f.cache.MarkDirty(T(3));  // twice is once
  REQUIRE(f.cache.WriteBack().ok());
  CHECK(f.file.write_log == std::vector<uint64_t>{T(1), T(2), T(3)});
  CHECK(f.checked == std::vector<uint64_t>{T(1), T(2), T(3)});
  CHECK(f.file.bytes[T(1)] == 0x11);
  CHECK(f.file.bytes[T(2) + kTable - 1] == 0x22);
  CHECK(f.file.bytes[T(3)] == 0x33);
  CHECK(f.file.bytes[T(0)] == 1);
  CHECK_FALSE(f.cache.HasDirty());
  REQUIRE(f.cache.WriteBack().ok());
  CHECK(f.file.write_log.size() == 3);
  // Written tables are clean: evicted without a write, read back as written.
  for (int i = 10; i < 20; ++i) f.Get(i);
  CHECK(f.file.write_log.size() == 3);
  CHECK((*f.Get(2))[0] == 0x22);
}

TEST_CASE("MarkDirty of a table not in the cache does nothing") {
  Fixture f;
  f.cache.MarkDirty(T(9));
  CHECK_FALSE(f.cache.HasDirty());
  REQUIRE(f.cache.WriteBack().ok());
  CHECK(f.file.write_log.empty());
}

TEST_CASE("a cache full of dirty tables grows past its capacity and never writes back by itself") {
  Fixture f;
  for (int i = 0; i < 4; ++i) f.Dirty(i, uint8_t(0xa0 + i));
  CHECK_FALSE(f.cache.over_capacity());
  f.Get(0);  // a hit needs no room
  TableCache::Table* t = f.Get(10);
  CHECK((*t)[0] == 11);
  CHECK(f.cache.size() == 5);
  CHECK(f.cache.over_capacity());
  // Nothing was written behind the writer's back, and every dirty table is kept.
  CHECK(f.file.write_log.empty());
  for (int i = 0; i < 4; ++i) CHECK((*f.Get(i))[0] == 0xa0 + i);
}

TEST_CASE("after a write-back, clean tables are evicted down to the capacity") {
  Fixture f;
  for (int i = 0; i < 6; ++i) f.Dirty(i, uint8_t(0xb0 + i));
  CHECK(f.cache.size() == 6);
  REQUIRE(f.cache.WriteBack().ok());
  CHECK(f.file.write_log == std::vector<uint64_t>{T(0), T(1), T(2), T(3), T(4), T(5)});
  f.Get(7);
  CHECK(f.cache.size() == 4);
  CHECK_FALSE(f.cache.over_capacity());
  CHECK(f.file.bytes[T(5)] == 0xb5);
}

TEST_CASE("check_write vetoes a write: nothing written there, the error propagates") {
  Fixture f;
  f.Dirty(1, 0x11);
  f.Dirty(2, 0x22);
  f.Dirty(3, 0x33);
  f.veto[T(2)] = Status::Corruption("table at 0x2000 would overwrite the refcount table");
  Status st = f.cache.WriteBack();
  CHECK(st.kind() == ErrorKind::kCorruption);
  CHECK(st.message().find("refcount table") != std::string::npos);
  CHECK(f.file.writes_of(T(2)) == 0);
  CHECK(f.file.bytes[T(2)] == 3);  // untouched
  CHECK(f.cache.HasDirty());       // the vetoed table is still dirty
  // Once the veto is lifted, the rest goes out.
  f.veto.clear();
  REQUIRE(f.cache.WriteBack().ok());
  CHECK(f.file.bytes[T(2)] == 0x22);
  CHECK(f.file.bytes[T(3)] == 0x33);
  CHECK(f.file.writes_of(T(1)) == 1);  // not written twice
  CHECK_FALSE(f.cache.HasDirty());
}

TEST_CASE("a full cache of dirty tables writes nothing on Get, so no veto can fire there") {
  Fixture f;
  for (int i = 0; i < 4; ++i) f.Dirty(i, 0xee);
  f.veto[T(0)] = Status::Corruption("vetoed");
  auto r = f.cache.Get(T(8));
  REQUIRE(r.ok());
  CHECK(f.checked.empty());
  CHECK(f.file.write_log.empty());
  CHECK(f.cache.WriteBack().kind() == ErrorKind::kCorruption);
}

TEST_CASE("write and read errors propagate; a failed read caches nothing") {
  Fixture f;
  f.file.fail_read[T(5)] = Status::IOError("read failed: Input/output error");
  auto r = f.cache.Get(T(5));
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().kind() == ErrorKind::kIOError);
  f.file.fail_read.clear();
  TableCache::Table* t = f.Get(5);  // read again, not a cached half table
  CHECK((*t)[0] == 6);
  CHECK(f.file.reads_of(T(5)) == 2);

  f.Dirty(5, 0x55);
  f.file.fail_write[T(5)] = Status::NoSpace("write failed: No space left on device");
  CHECK(f.cache.WriteBack().kind() == ErrorKind::kNoSpace);
  CHECK(f.cache.HasDirty());
  f.file.fail_write.clear();
  CHECK(f.cache.WriteBack().ok());
  CHECK(f.file.bytes[T(5)] == 0x55);
}
