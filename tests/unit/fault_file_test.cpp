// FaultFile (tests/support): injected failures, counters, power cuts, and
// that the library's Image runs over it.
#include "support/fault_file.h"

#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "qcow2dedup/image.h"
#include "support/process.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::FaultFile;
using testing::FaultKind;
using testing::TempDir;
using testing::UnsyncedOp;

namespace {

std::vector<uint8_t> Bytes(size_t n, uint8_t v) { return std::vector<uint8_t>(n, v); }

// A file of size bytes, byte i = i * 7 + 1, wrapped in a FaultFile.
std::unique_ptr<FaultFile> MakeFile(const TempDir& dir, const std::string& name, size_t size) {
  auto f = OpenPosixFile(dir / name, OpenMode::kCreate);
  REQUIRE(f.ok());
  std::vector<uint8_t> b(size);
  for (size_t i = 0; i < size; ++i) b[i] = uint8_t(i * 7 + 1);
  if (size) REQUIRE((*f)->WriteAt(0, b).ok());
  REQUIRE((*f)->Sync().ok());
  return std::make_unique<FaultFile>(std::move(f).value());
}

std::vector<uint8_t> Contents(File& f) {
  auto size = f.Size();
  REQUIRE(size.ok());
  std::vector<uint8_t> b(*size);
  REQUIRE(f.ReadAt(0, b).ok());
  return b;
}

std::vector<uint8_t> ContentsOf(const std::string& path) {
  auto f = OpenPosixFile(path, OpenMode::kReadOnly);
  REQUIRE(f.ok());
  return Contents(**f);
}

}  // namespace

TEST_CASE("passes reads and writes through and counts them") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 4096);
  std::vector<uint8_t> b(16);
  REQUIRE(f->ReadAt(100, b).ok());
  CHECK(b[0] == uint8_t(100 * 7 + 1));
  REQUIRE(f->WriteAt(8192, Bytes(10, 0xee)).ok());
  REQUIRE(f->Sync().ok());
  REQUIRE(f->Truncate(9000).ok());
  CHECK(f->reads() == 1);
  CHECK(f->writes() == 1);
  CHECK(f->syncs() == 1);
  CHECK(f->truncates() == 1);
  CHECK(f->bytes_written() == 10);
  CHECK(*f->Size() == 9000);
  CHECK(f->name() == dir / "f");
  auto c = ContentsOf(dir / "f");
  REQUIRE(c.size() == 9000);
  CHECK(c[8192] == 0xee);
  CHECK(c[5000] == 0);  // the hole
}

TEST_CASE("fails the n-th write with EIO or ENOSPC and leaves the file alone") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 4096);
  f->FailWrite(2);
  CHECK(f->WriteAt(0, Bytes(10, 1)).ok());
  Status st = f->WriteAt(100, Bytes(10, 2));
  CHECK(st.kind() == ErrorKind::kIOError);
  CHECK(st.message().find("0x64") != std::string::npos);
  CHECK(f->WriteAt(200, Bytes(10, 3)).ok());
  CHECK(f->writes() == 3);
  CHECK(f->failed_writes() == 1);
  auto c = Contents(*f);
  CHECK(c[0] == 1);
  CHECK(c[100] == uint8_t(100 * 7 + 1));  // the failed write stored nothing
  CHECK(c[200] == 3);

  f->FailWrite(4, FaultKind::kENOSPC);
  CHECK(f->WriteAt(300, Bytes(1, 4)).kind() == ErrorKind::kNoSpace);
  CHECK(f->WriteAt(300, Bytes(1, 4)).ok());

  SUBCASE("n at or below the count so far never fires") {
    f->FailWrite(1);
    CHECK(f->WriteAt(0, Bytes(1, 9)).ok());
  }
  SUBCASE("sticky: every write from n on fails, syncs are separate") {
    f->FailWrite(7, FaultKind::kEIO, /*sticky=*/true);
    CHECK(f->WriteAt(0, Bytes(1, 9)).ok());  // 6th
    for (int i = 0; i < 5; ++i) CHECK(f->WriteAt(0, Bytes(1, 9)).kind() == ErrorKind::kIOError);
    CHECK(f->Sync().ok());
    f->ClearFaults();
    CHECK(f->WriteAt(0, Bytes(1, 9)).ok());
  }
}

TEST_CASE("a torn write stores its first bytes, then fails") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 4096);
  f->FailWrite(1, FaultKind::kENOSPC, false, 3);
  CHECK(f->WriteAt(10, Bytes(8, 0xaa)).kind() == ErrorKind::kNoSpace);
  auto c = Contents(*f);
  CHECK(c[10] == 0xaa);
  CHECK(c[12] == 0xaa);
  CHECK(c[13] == uint8_t(13 * 7 + 1));
  CHECK(f->bytes_written() == 3);
  CHECK(f->unsynced_ops() == 1);  // the torn part is as unsynced as any write
}

TEST_CASE("fails the n-th sync; a failed sync does not make writes durable") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 4096);
  f->FailSync(1);
  REQUIRE(f->WriteAt(0, Bytes(4, 0x55)).ok());
  CHECK(f->Sync().kind() == ErrorKind::kIOError);
  CHECK(f->failed_syncs() == 1);
  CHECK(f->unsynced_ops() == 1);
  CHECK(f->Sync().ok());
  CHECK(f->unsynced_ops() == 0);
  f->FailSync(3, FaultKind::kENOSPC);
  CHECK(f->Sync().kind() == ErrorKind::kNoSpace);
}

TEST_CASE("injected truncate and read failures") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 4096);
  f->FailTruncate(1);
  CHECK(f->Truncate(10).kind() == ErrorKind::kIOError);
  CHECK(*f->Size() == 4096);
  f->FailReads(true);
  std::vector<uint8_t> b(4);
  CHECK(f->ReadAt(0, b).kind() == ErrorKind::kIOError);
  f->FailReads(false);
  CHECK(f->ReadAt(0, b).ok());
}

TEST_CASE("a power cut drops every write since the last successful sync") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 4096);
  const auto original = Contents(*f);
  REQUIRE(f->WriteAt(0, Bytes(100, 1)).ok());
  REQUIRE(f->Sync().ok());
  auto synced = Contents(*f);
  CHECK(f->synced_size() == 4096);

  REQUIRE(f->WriteAt(50, Bytes(100, 2)).ok());       // inside
  REQUIRE(f->WriteAt(4000, Bytes(200, 3)).ok());     // across the end
  REQUIRE(f->WriteAt(100000, Bytes(10, 4)).ok());    // past the end, leaves a hole
  REQUIRE(f->WriteAt(60, Bytes(10, 5)).ok());        // over an unsynced write
  CHECK(f->unsynced_ops() == 4);
  CHECK(*f->Size() == 100010);

  // CrashImage shows the outcome without touching the file.
  auto crash = f->CrashImage();
  REQUIRE(crash.ok());
  CHECK(*crash == synced);
  CHECK(*f->Size() == 100010);

  REQUIRE(f->PowerCut().ok());
  CHECK_FALSE(f->powered());
  CHECK(ContentsOf(dir / "f") == synced);
  CHECK(synced != original);

  // Nothing works until the power is back.
  std::vector<uint8_t> b(1);
  CHECK(f->ReadAt(0, b).kind() == ErrorKind::kIOError);
  CHECK(f->WriteAt(0, b).kind() == ErrorKind::kIOError);
  CHECK(f->Sync().kind() == ErrorKind::kIOError);
  CHECK_FALSE(f->Size().ok());
  f->PowerOn();
  CHECK(f->unsynced_ops() == 0);
  CHECK(Contents(*f) == synced);
}

TEST_CASE("a power cut undoes unsynced truncates, shrinking or growing") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 10000);
  const auto original = Contents(*f);
  REQUIRE(f->Truncate(1000).ok());
  REQUIRE(f->WriteAt(1500, Bytes(10, 9)).ok());
  REQUIRE(f->Truncate(50000).ok());
  REQUIRE(f->Truncate(700).ok());
  CHECK(*f->CrashImage() == original);
  REQUIRE(f->PowerCut().ok());
  CHECK(ContentsOf(dir / "f") == original);
}

TEST_CASE("the crash image can keep any subset of the unsynced operations") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 300);
  const auto original = Contents(*f);
  REQUIRE(f->WriteAt(0, Bytes(100, 1)).ok());    // op 0
  REQUIRE(f->WriteAt(50, Bytes(100, 2)).ok());   // op 1, overlaps op 0
  REQUIRE(f->WriteAt(290, Bytes(20, 3)).ok());   // op 2, grows the file to 310
  auto log = f->UnsyncedLog();
  REQUIRE(log.size() == 3);
  CHECK(log[1].kind == UnsyncedOp::kWrite);
  CHECK(log[1].offset == 50);
  std::vector<uint8_t> replaced(original.begin() + 50, original.begin() + 150);
  std::fill(replaced.begin(), replaced.begin() + 50, uint8_t(1));  // op 0 had written 50..99
  CHECK(log[1].old == replaced);
  CHECK(log[2].old_size == 300);
  CHECK(log[2].old.size() == 10);

  auto only = [](size_t keep) { return [keep](size_t i, const UnsyncedOp&) { return i == keep; }; };
  SUBCASE("the later write alone") {
    auto c = *f->CrashImage(only(1));
    REQUIRE(c.size() == 300);
    CHECK(c[0] == original[0]);
    CHECK(c[49] == original[49]);
    CHECK(c[50] == 2);
    CHECK(c[149] == 2);
    CHECK(c[150] == original[150]);
  }
  SUBCASE("the earlier write alone") {
    auto c = *f->CrashImage(only(0));
    CHECK(c[0] == 1);
    CHECK(c[99] == 1);
    CHECK(c[100] == original[100]);
  }
  SUBCASE("the growing write alone") {
    auto c = *f->CrashImage(only(2));
    REQUIRE(c.size() == 310);
    CHECK(c[289] == original[289]);
    CHECK(c[290] == 3);
    CHECK(c[309] == 3);
  }
  SUBCASE("all of them: the file as it is") {
    auto c = *f->CrashImage([](size_t, const UnsyncedOp&) { return true; });
    CHECK(c == Contents(*f));
  }
  SUBCASE("saved to a file, and cut for real") {
    REQUIRE(f->SaveCrashImage(dir / "crash", only(1)).ok());
    auto expected = *f->CrashImage(only(1));
    CHECK(ContentsOf(dir / "crash") == expected);
    REQUIRE(f->PowerCut(only(1)).ok());
    CHECK(ContentsOf(dir / "f") == expected);
  }
}

TEST_CASE("shared handles see one state") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 100);
  auto g = f->Share();
  REQUIRE(g->WriteAt(0, Bytes(1, 1)).ok());
  CHECK(f->writes() == 1);
  f->FailWrite(2);
  CHECK(g->WriteAt(0, Bytes(1, 1)).kind() == ErrorKind::kIOError);
  REQUIRE(f->PowerCut().ok());
  CHECK_FALSE(g->Sync().ok());
  g.reset();  // the other handle still works
  f->PowerOn();
  CHECK(f->WriteAt(0, Bytes(1, 1)).ok());
}

TEST_CASE("thread safety: concurrent writers and readers") {
  TempDir dir;
  auto f = MakeFile(dir, "f", 0);
  const auto original = Contents(*f);
  const uint64_t reads_before = f->reads();
  constexpr int kThreads = 8, kWrites = 200;
  constexpr size_t kBlock = 4096;
  std::atomic<int> bad_reads{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t) {
    pool.emplace_back([&, t] {
      auto h = f->Share();
      std::vector<uint8_t> buf(kBlock), got(kBlock);
      for (int i = 0; i < kWrites; ++i) {
        uint64_t off = (uint64_t(i) * kThreads + t) * kBlock;
        std::fill(buf.begin(), buf.end(), uint8_t(t * 31 + i));
        if (!h->WriteAt(off, buf).ok()) ++bad_reads;
        if (!h->ReadAt(off, got).ok() || got != buf) ++bad_reads;
      }
    });
  }
  for (auto& th : pool) th.join();
  CHECK(bad_reads == 0);
  CHECK(f->writes() == kThreads * kWrites);
  CHECK(f->reads() - reads_before == kThreads * kWrites);
  CHECK(f->unsynced_ops() == kThreads * kWrites);
  CHECK(*f->Size() == kThreads * kWrites * kBlock);
  REQUIRE(f->PowerCut().ok());
  CHECK(ContentsOf(dir / "f") == original);
}

// The library over a FaultFile: an injected failure surfaces with its kind,
// and Flush's durability survives a power cut.
TEST_CASE("an Image over a FaultFile") {
  testing::RequireCommand("qemu-img");
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  REQUIRE(testing::Run("qemu-img create -q -f qcow2 " + testing::Sh(img) + " 4M").exit_code == 0);
  auto ff = FaultFile::Open(img);
  REQUIRE(ff.ok());
  auto ctl = (*ff)->Share();
  OpenOptions o;
  o.writable = true;
  o.file = std::move(ff).value();
  auto image = Image::Open(img, std::move(o));
  REQUIRE_MESSAGE(image.ok(), image.status().message());
  std::vector<uint8_t> data(65536);
  for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(i * 13 + 5);

  SUBCASE("flushed data survives a power cut") {
    REQUIRE((*image)->Write(65536, data).ok());
    REQUIRE((*image)->Flush().ok());
    CHECK(ctl->syncs() > 0);
    CHECK(ctl->writes() > 0);
    REQUIRE(ctl->PowerCut().ok());
    image->reset();
    auto again = Image::Open(img, {});
    REQUIRE_MESSAGE(again.ok(), again.status().message());
    std::vector<uint8_t> got(data.size());
    REQUIRE((*again)->Read(65536, got).ok());
    CHECK(got == data);
  }
  SUBCASE("unflushed data may be lost, the image still opens and reads") {
    REQUIRE((*image)->Write(65536, data).ok());
    REQUIRE(ctl->PowerCut().ok());
    image->reset();
    auto again = Image::Open(img, {});
    REQUIRE_MESSAGE(again.ok(), again.status().message());
    std::vector<uint8_t> got(data.size());
    REQUIRE((*again)->Read(65536, got).ok());
    CHECK((got == data || got == std::vector<uint8_t>(data.size(), 0)));
  }
  auto fail_next_writes = [&](FaultKind kind) {
    ctl->FailWrite(ctl->writes() + 1, kind, /*sticky=*/true);
    Status st = (*image)->Write(65536, data);
    if (st.ok()) st = (*image)->Flush();
    REQUIRE_FALSE(st.ok());
    CHECK(ctl->failed_writes() >= 1);
    return st;
  };
  SUBCASE("a failed write surfaces as IOError") {
    CHECK(fail_next_writes(FaultKind::kEIO).kind() == ErrorKind::kIOError);
  }
  SUBCASE("a full disk surfaces as NoSpace") {
    CHECK(fail_next_writes(FaultKind::kENOSPC).kind() == ErrorKind::kNoSpace);
  }
  SUBCASE("a failed sync surfaces from Flush") {
    REQUIRE((*image)->Write(65536, data).ok());
    ctl->FailSync(ctl->syncs() + 1, FaultKind::kEIO, /*sticky=*/true);
    CHECK((*image)->Flush().kind() == ErrorKind::kIOError);
  }
}
