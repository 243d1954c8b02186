// image/refcounts on an in-memory image with a 4-table cache: allocation
// across many refcount blocks, the refcount table's growth (it moves, and
// its new home's block describes itself), frees that wait for the flush,
// and what is written back loading again the same.
#include "image/refcounts.h"

#include <doctest/doctest.h>

#include <set>

#include "image/image_state.h"
#include "support/memory_file.h"

using namespace qcow2dedup;
using namespace testing;

namespace {

constexpr uint32_t kCluster = 512;  // 256 refcounts a block at 16 bits

// A fresh 64 KiB image in memory: its refcount table covers 64 blocks.
std::vector<uint8_t> FreshImage() {
  CreateOptions c;
  c.virtual_size = 64 << 10;
  c.cluster_size = kCluster;
  OpenOptions o;
  o.file = std::make_unique<MemoryFile>(std::vector<uint8_t>{});
  auto img = Image::Create("memory", c, std::move(o));
  REQUIRE(img.ok());
  REQUIRE((*img)->Close().ok());
  auto* f = dynamic_cast<MemoryFile*>(StateOf(**img).file.get());
  REQUIRE(f);
  return f->bytes();
}

struct Loaded {
  MemoryFile file;
  Header h;
  MetadataMap meta{h};
  std::unique_ptr<Refcounts> rc;
  explicit Loaded(std::vector<uint8_t> bytes) : file(std::move(bytes)) {
    const uint64_t size = file.bytes().size();
    auto parsed = ParseHeader(std::span(file.bytes()).first(std::min<size_t>(size, kCluster)), size);
    REQUIRE(parsed.ok());
    h = *parsed;
    rc = std::make_unique<Refcounts>(&file, &h, &meta, 4);
    REQUIRE(rc->Load(size).ok());
  }
  void WriteBack() {
    REQUIRE(rc->WriteBlocks().ok());
    REQUIRE(rc->WriteTable().ok());
    auto head = EncodeHeader(h);
    REQUIRE(head.ok());
    REQUIRE(file.WriteAt(0, *head).ok());
  }
};

}  // namespace

TEST_CASE("20000 allocations through a 4-block cache: distinct, outside all metadata, table grown") {
  Loaded l(FreshImage());
  const uint64_t first_table = l.h.reftable_offset;
  std::set<uint64_t> got;
  for (int i = 0; i < 20000; ++i) {
    auto off = l.rc->Allocate();
    REQUIRE(off.ok());
    CHECK(*off % kCluster == 0);
    CHECK_FALSE(l.meta.IsTable(*off));
    CHECK(l.meta.FixedStructureAt(*off) == nullptr);
    CHECK(got.insert(*off).second);
  }
  // 20000 clusters need more than the table's 64 blocks: it moved.
  CHECK(l.h.reftable_offset != first_table);
  CHECK(l.rc->table().size() * 256 >= 20000);
  for (uint64_t off : got) {
    auto v = l.rc->Get(off / kCluster);
    REQUIRE(v.ok());
    CHECK(*v == 1);
  }
  // The new table's clusters are counted too.
  for (uint64_t i = 0; i < l.h.reftable_clusters; ++i) {
    auto v = l.rc->Get(l.h.reftable_offset / kCluster + i);
    REQUIRE(v.ok());
    CHECK(*v == 1);
  }
  l.WriteBack();
  // What went to the file loads back the same.
  Loaded again(l.file.bytes());
  CHECK(again.h.reftable_offset == l.h.reftable_offset);
  for (uint64_t off : got) {
    auto v = again.rc->Get(off / kCluster);
    REQUIRE(v.ok());
    CHECK(*v == 1);
  }
}

TEST_CASE("a freed cluster is not handed out again until ReleasePendingFrees") {
  Loaded l(FreshImage());
  std::vector<uint64_t> offs;
  for (int i = 0; i < 2000; ++i) {
    auto off = l.rc->Allocate();
    REQUIRE(off.ok());
    offs.push_back(*off);
  }
  std::set<uint64_t> freed;
  for (size_t i = 0; i < offs.size(); i += 3) {
    auto left = l.rc->Adjust(offs[i] / kCluster, -1);
    REQUIRE(left.ok());
    CHECK(*left == 0);
    CHECK(l.rc->IsPendingFree(offs[i] / kCluster));
    freed.insert(offs[i] / kCluster);
  }
  for (int i = 0; i < 500; ++i) {
    auto off = l.rc->Allocate();
    REQUIRE(off.ok());
    CHECK(freed.count(*off / kCluster) == 0);
  }
  CHECK(l.rc->Adjust(offs[0] / kCluster, -1).status().kind() == ErrorKind::kCorruption);  // below zero
  std::vector<uint64_t> released = l.rc->ReleasePendingFrees();
  CHECK(std::set<uint64_t>(released.begin(), released.end()) == freed);
  auto off = l.rc->Allocate();
  REQUIRE(off.ok());
  CHECK(*off / kCluster == *freed.begin());
}

TEST_CASE("AllocateRange gives contiguous clusters past everything allocated, blocks included") {
  Loaded l(FreshImage());
  for (int i = 0; i < 300; ++i) REQUIRE(l.rc->Allocate().ok());
  auto end = l.rc->EndCluster();
  REQUIRE(end.ok());
  auto at = l.rc->AllocateRange(600);  // crosses block boundaries
  REQUIRE_MESSAGE(at.ok(), at.status().message());
  CHECK(*at / kCluster >= *end);
  for (uint64_t c = *at / kCluster; c < *at / kCluster + 600; ++c) {
    CHECK_FALSE(l.meta.IsTable(c * kCluster));
    auto v = l.rc->Get(c);
    REQUIRE(v.ok());
    CHECK(*v == 1);
  }
}
