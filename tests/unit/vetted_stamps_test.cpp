// io/vetted_stamps: a record vouches for a file exactly as a clean close
// left it; any write, another file, a torn or missing store vouch for
// nothing. And the writer: only a vouched-for file skips the metadata pass.
#include "io/vetted_stamps.h"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "qcow2dedup/image.h"
#include "support/qcow2_layout.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using namespace testing;

namespace {

FileStamp StampOf(const std::string& path) {
  auto f = OpenPosixFile(path, OpenMode::kReadOnly);
  REQUIRE(f.ok());
  std::optional<FileStamp> s = (*f)->Stamp();
  REQUIRE(s.has_value());
  return *s;
}

void WriteBytes(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
  auto f = OpenPosixFile(path, OpenMode::kCreateOrOpen);
  REQUIRE(f.ok());
  REQUIRE((*f)->WriteAt(offset, bytes).ok());
}

// Resets the process's store when a test ends, whatever happened.
struct StoreAt {
  explicit StoreAt(const std::string& path) { SetVettedStampsPath(path); }
  ~StoreAt() { SetVettedStampsPath(""); }
};

}  // namespace

TEST_CASE("a record vouches for the file as it was, and for nothing else") {
  TempDir dir;
  const VettedStamps store(dir / "cache/qcow2dedup/vetted");  // directories made on the first record
  const std::string a = dir / "a", b = dir / "b";
  WriteBytes(a, 0, std::vector<uint8_t>(4096, 1));
  WriteBytes(b, 0, std::vector<uint8_t>(4096, 1));
  CHECK_FALSE(store.Vouches(StampOf(a)));  // no store yet
  store.Record(StampOf(a));
  CHECK(store.Vouches(StampOf(a)));
  CHECK_FALSE(store.Vouches(StampOf(b)));  // same bytes, another file
  // The same byte written again still changes the change time.
  WriteBytes(a, 100, {1});
  CHECK_FALSE(store.Vouches(StampOf(a)));
  store.Record(StampOf(a));
  CHECK(store.Vouches(StampOf(a)));
  // A torn or damaged store vouches for nothing.
  WriteBytes(dir / "cache/qcow2dedup/vetted", 0, std::vector<uint8_t>(VettedStamps::kSlots * 64, 0x5a));
  CHECK_FALSE(store.Vouches(StampOf(a)));
  // A store that cannot be written is no error: nothing is remembered.
  const VettedStamps nowhere("/proc/qcow2dedup-no-such-dir/vetted");
  nowhere.Record(StampOf(a));
  CHECK_FALSE(nowhere.Vouches(StampOf(a)));
}

TEST_CASE("a writable open skips the metadata pass only for a file a clean close of ours left as it is") {
  TempDir dir;
  const std::string path = dir / "img.qcow2", vetted = dir / "vetted";
  StoreAt store(vetted);
  CreateOptions c;
  c.virtual_size = 1 << 20;
  c.cluster_size = 4096;
  {
    auto img = Image::Create(path, c, OpenOptions{});
    REQUIRE(img.ok());
    REQUIRE((*img)->Write(0, std::vector<uint8_t>(8192, 7)).ok());
    REQUIRE((*img)->Close().ok());
  }
  CHECK(VettedStamps(vetted).Vouches(StampOf(path)));
  auto w = [] {
    OpenOptions o;
    o.writable = true;
    return o;
  };
  {
    auto img = Image::Open(path, w());  // vouched for; writes, closes, and is vouched for again
    REQUIRE(img.ok());
    REQUIRE((*img)->Write(8192, std::vector<uint8_t>(4096, 9)).ok());
    REQUIRE((*img)->Close().ok());
  }
  CHECK(VettedStamps(vetted).Vouches(StampOf(path)));
  // Damage only the full pass sees: the data cluster's refcount set to 0.
  std::string error;
  auto layout = ReadQcow2Layout(path, &error);
  REQUIRE_MESSAGE(layout.has_value(), error);
  const uint64_t data = layout->HostOffset(0) / layout->cluster_size;
  REQUIRE(data != 0);
  REQUIRE(layout->refcount_bits == 16);
  WriteBytes(path, layout->refblocks.at(0) + 2 * data, {0, 0});
  auto refused = Image::Open(path, w());
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().kind() == ErrorKind::kCorruption);
  // The same damage with a record that matches is not looked for: the
  // record is all that stands for the pass.
  VettedStamps(vetted).Record(StampOf(path));
  {
    auto trusted = Image::Open(path, w());
    CHECK(trusted.ok());
  }
  // Without a store every writable open runs the pass.
  SetVettedStampsPath("");
  VettedStamps(vetted).Record(StampOf(path));
  auto again = Image::Open(path, w());
  REQUIRE_FALSE(again.ok());
  CHECK(again.status().kind() == ErrorKind::kCorruption);
}
