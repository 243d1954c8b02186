// io/posix_file: reads past the end, writes, sizes, truncation, holes, and
// QEMU's image locks, against our own second opening and against qemu-io.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "qcow2dedup/file.h"
#include "support/process.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Run;
using testing::Sh;
using testing::TempDir;

namespace {

using Bytes = std::vector<uint8_t>;

std::unique_ptr<File> Open(const std::string& path, OpenMode mode) {
  auto f = OpenPosixFile(path, mode);
  REQUIRE_MESSAGE(f.ok(), f.status().message());
  return std::move(f).value();
}

// The single-byte OFD locks /proc/locks lists for path's inode.
std::set<uint64_t> LockedBytes(const std::string& path) {
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  const std::string ino = ":" + std::to_string(st.st_ino);
  std::ifstream f("/proc/locks");
  std::set<uint64_t> out;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream in(line);
    std::string n, kind, adv, type, pid, dev, start, end;
    in >> n >> kind;
    if (kind == "->") continue;  // a waiter
    in >> adv >> type >> pid >> dev >> start >> end;
    if (kind != "OFDLCK" || dev.size() < ino.size() || dev.compare(dev.size() - ino.size(), ino.size(), ino) != 0)
      continue;
    for (uint64_t b = std::stoull(start); b <= std::stoull(end); ++b) out.insert(b);
  }
  return out;
}

template <class Pred>
bool WaitUntil(Pred pred, double seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

// qemu-io holding an image open: it reads commands from a pipe we keep
// open, and quits when we close it.
class QemuIoHolder {
 public:
  QemuIoHolder(const std::string& image, bool read_only) {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::dup2(fds[0], 0);
      ::close(fds[0]);
      ::close(fds[1]);
      int null = ::open("/dev/null", O_WRONLY);
      ::dup2(null, 1);
      ::dup2(null, 2);
      if (read_only) ::execlp("qemu-io", "qemu-io", "-r", "-f", "qcow2", image.c_str(), (char*)nullptr);
      else ::execlp("qemu-io", "qemu-io", "-f", "qcow2", image.c_str(), (char*)nullptr);
      ::_exit(127);
    }
    ::close(fds[0]);
    pipe_ = fds[1];
  }
  ~QemuIoHolder() { Stop(); }
  void Stop() {
    if (pipe_ >= 0) ::close(pipe_);
    pipe_ = -1;
    if (pid_ <= 0) return;
    int status = 0;
    const bool gone = WaitUntil([&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; }, 10);
    if (!gone) {
      ::kill(pid_, SIGKILL);  // our own child, by its id
      ::waitpid(pid_, &status, 0);
    }
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  int pipe_ = -1;
};

void MakeImage(const std::string& path) {
  auto r = Run("qemu-img create -q -f qcow2 " + Sh(path) + " 1M");
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
}

void RequireQemu() {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
}

}  // namespace

TEST_CASE("reads past the end of the file read zeros") {
  TempDir dir;
  auto f = Open(dir / "f", OpenMode::kCreate);
  Bytes data(100);
  for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(i + 1);
  REQUIRE(f->WriteAt(0, data).ok());
  Bytes buf(100, 0xee);
  REQUIRE(f->ReadAt(50, buf).ok());
  CHECK(buf[0] == 51);
  CHECK(buf[49] == 100);
  for (size_t i = 50; i < 100; ++i) CHECK(buf[i] == 0);
  std::fill(buf.begin(), buf.end(), 0xee);
  REQUIRE(f->ReadAt(1u << 30, buf).ok());
  CHECK(buf == Bytes(100, 0));
  Bytes big(1 << 20, 0xee);  // one call, mostly past the end
  REQUIRE(f->ReadAt(0, big).ok());
  CHECK(big[99] == 100);
  CHECK(big[100] == 0);
  CHECK(big.back() == 0);
  CHECK(*f->Size() == 100);  // reading does not grow the file
}

// Whether this process holds a descriptor of path opened with O_DIRECT.
bool HasDirectDescriptor(const std::string& path) {
  for (int fd = 0; fd < 1024; ++fd) {
    char link[4096];
    const std::string self = "/proc/self/fd/" + std::to_string(fd);
    ssize_t n = ::readlink(self.c_str(), link, sizeof link - 1);
    if (n <= 0 || std::string(link, size_t(n)) != path) continue;
    std::ifstream info("/proc/self/fdinfo/" + std::to_string(fd));
    std::string key, flags;
    while (info >> key >> flags)
      if (key == "flags:" && (std::stoul(flags, nullptr, 8) & O_DIRECT)) return true;
  }
  return false;
}

TEST_CASE("ReadUncached reads what ReadAt reads: unsynced writes, the end of the file, unaligned asks") {
  TempDir dir;
  auto f = Open(dir / "f", OpenMode::kCreate);
  Bytes data(3 * 4096 + 100);
  for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(i * 7 + 1);
  REQUIRE(f->WriteAt(0, data).ok());  // still only in the page cache
  struct Aligned {
    uint8_t* p = static_cast<uint8_t*>(std::aligned_alloc(4096, 1 << 20));
    ~Aligned() { std::free(p); }
  } mem;
  // Aligned: direct where the file system allows it; past the end reads zero.
  std::span<uint8_t> whole(mem.p, 4 * 4096);
  std::fill(whole.begin(), whole.end(), 0xee);
  REQUIRE(f->ReadUncached(0, whole).ok());
  CHECK(Bytes(whole.begin(), whole.begin() + data.size()) == data);
  CHECK(Bytes(whole.begin() + data.size(), whole.end()) == Bytes(whole.size() - data.size(), 0));
  std::span<uint8_t> second(mem.p, 4096);
  REQUIRE(f->ReadUncached(4096, second).ok());
  CHECK(Bytes(second.begin(), second.end()) == Bytes(data.begin() + 4096, data.begin() + 8192));
  if (!HasDirectDescriptor(dir / "f")) MESSAGE("no O_DIRECT on this file system: cached reads were used");
  // Unaligned offset, size or buffer: through the cache, the same bytes.
  Bytes odd(5000, 0xee);
  REQUIRE(f->ReadUncached(3, odd).ok());
  CHECK(odd == Bytes(data.begin() + 3, data.begin() + 5003));
  std::span<uint8_t> shifted(mem.p + 1, 4096);
  REQUIRE(f->ReadUncached(0, shifted).ok());
  CHECK(Bytes(shifted.begin(), shifted.end()) == Bytes(data.begin(), data.begin() + 4096));
  // Writes after a direct read are seen by the next one.
  Bytes later(4096, 0x5a);
  REQUIRE(f->WriteAt(4096, later).ok());
  REQUIRE(f->ReadUncached(4096, second).ok());
  CHECK(Bytes(second.begin(), second.end()) == later);
}

TEST_CASE("write, read, size, truncate, sync") {
  TempDir dir;
  auto f = Open(dir / "f", OpenMode::kCreate);
  CHECK(f->name() == dir / "f");
  CHECK(*f->Size() == 0);
  Bytes a(5000, 0xa5);
  REQUIRE(f->WriteAt(4096, a).ok());
  CHECK(*f->Size() == 9096);
  Bytes got(5000);
  REQUIRE(f->ReadAt(4096, got).ok());
  CHECK(got == a);
  Bytes head(4096, 0xee);
  REQUIRE(f->ReadAt(0, head).ok());
  CHECK(head == Bytes(4096, 0));  // the hole before the write
  REQUIRE(f->Sync().ok());
  REQUIRE(f->Truncate(4100).ok());
  CHECK(*f->Size() == 4100);
  Bytes tail(8, 0xee);
  REQUIRE(f->ReadAt(4096, tail).ok());
  CHECK(tail == Bytes{0xa5, 0xa5, 0xa5, 0xa5, 0, 0, 0, 0});
  REQUIRE(f->Truncate(1 << 20).ok());
  CHECK(*f->Size() == 1 << 20);
  REQUIRE(f->ReadAt(4096, tail).ok());
  CHECK(tail == Bytes{0xa5, 0xa5, 0xa5, 0xa5, 0, 0, 0, 0});
  // What another opening sees.
  auto g = Open(dir / "f", OpenMode::kReadOnly);
  CHECK(*g->Size() == 1 << 20);
  Bytes x(4);
  REQUIRE(g->ReadAt(4096, x).ok());
  CHECK(x == Bytes(4, 0xa5));
}

TEST_CASE("open modes and their errors") {
  TempDir dir;
  CHECK(OpenPosixFile(dir / "missing", OpenMode::kReadOnly).status().kind() == ErrorKind::kNotFound);
  CHECK(OpenPosixFile(dir / "missing", OpenMode::kReadWrite).status().kind() == ErrorKind::kNotFound);
  auto f = Open(dir / "f", OpenMode::kCreate);
  REQUIRE(f->WriteAt(0, Bytes(10, 1)).ok());
  CHECK(OpenPosixFile(dir / "f", OpenMode::kCreate).status().kind() == ErrorKind::kExists);
  auto g = Open(dir / "f", OpenMode::kCreateOrOpen);
  CHECK(*g->Size() == 10);  // never truncates
  CHECK(OpenPosixFile(dir.path(), OpenMode::kReadOnly).status().kind() == ErrorKind::kInvalidArgument);
  auto ro = Open(dir / "f", OpenMode::kReadOnly);
  Status st = ro->WriteAt(0, Bytes(1, 2));
  CHECK(st.kind() == ErrorKind::kIOError);
  CHECK_FALSE(st.message().empty());
  CHECK_FALSE(ro->Truncate(0).ok());
  CHECK(*ro->Size() == 10);
}

TEST_CASE("NextData finds data after holes") {
  TempDir dir;
  auto f = Open(dir / "sparse", OpenMode::kCreate);
  const uint64_t size = 64ull << 20, at = 32ull << 20;
  REQUIRE(f->Truncate(size).ok());
  REQUIRE(f->WriteAt(at, Bytes(4096, 1)).ok());
  REQUIRE(f->Sync().ok());
  // Whether this file system reports holes at all: SEEK_DATA by hand.
  const int fd = ::open((dir / "sparse").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  const bool holes = ::lseek(fd, 0, SEEK_DATA) == off_t(at);
  ::close(fd);
  auto n = f->NextData(0);
  REQUIRE(n.ok());
  if (holes) {
    CHECK(*n == at);
    CHECK(*f->NextData(4096) == at);
    CHECK(*f->NextData(at + 100) == at + 100);  // inside data: itself
    CHECK(*f->NextData(at + (1 << 20)) == size);  // only a hole after: the end
  } else {
    MESSAGE("this file system reports no holes");
    CHECK(*n <= at);
  }
  CHECK(*f->NextData(size) == size);
  CHECK(*f->NextData(size + 12345) == size);
}

TEST_CASE("our locks are QEMU's bytes, and two openings exclude each other") {
  TempDir dir;
  const std::string p = dir / "img";
  auto a = Open(p, OpenMode::kCreate);
  REQUIRE(a->Lock(LockMode::kNone).ok());
  CHECK(LockedBytes(p).empty());

  SUBCASE("exclusive: the bytes qemu-io takes for read-write") {
    REQUIRE(a->Lock(LockMode::kExclusive).ok());
    CHECK(LockedBytes(p) == std::set<uint64_t>{100, 101, 103, 201, 203});
    auto b = Open(p, OpenMode::kReadOnly);
    Status s1 = b->Lock(LockMode::kShared);
    CHECK(s1.kind() == ErrorKind::kBusy);
    CHECK(s1.message().find("in use") != std::string::npos);
    // The holder is another opening in this very process.
    CHECK_MESSAGE(s1.message().find("this process (pid " + std::to_string(::getpid()) + ") holds its lock") !=
                      std::string::npos,
                  s1.message());
    auto c = Open(p, OpenMode::kReadWrite);
    CHECK(c->Lock(LockMode::kExclusive).kind() == ErrorKind::kBusy);
    a.reset();  // closing releases
    CHECK(LockedBytes(p).empty());
    CHECK(c->Lock(LockMode::kExclusive).ok());
  }
  SUBCASE("shared: the bytes qemu-io -r takes; readers coexist, writers do not") {
    REQUIRE(a->Lock(LockMode::kShared).ok());
    CHECK(LockedBytes(p) == std::set<uint64_t>{100, 201, 203});
    auto b = Open(p, OpenMode::kReadOnly);
    CHECK(b->Lock(LockMode::kShared).ok());
    auto c = Open(p, OpenMode::kReadWrite);
    CHECK(c->Lock(LockMode::kExclusive).kind() == ErrorKind::kBusy);
  }
}

TEST_CASE("while qemu-io holds the image read-write, we are busy") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  MakeImage(img);
  QemuIoHolder q(img, /*read_only=*/false);
  REQUIRE_MESSAGE(WaitUntil([&] { return LockedBytes(img).count(201) == 1; }, 20), "qemu-io never locked the image");
  auto f = Open(img, OpenMode::kReadWrite);
  Status ex = f->Lock(LockMode::kExclusive);
  CHECK(ex.kind() == ErrorKind::kBusy);
  CHECK_FALSE(ex.message().empty());
  auto g = Open(img, OpenMode::kReadOnly);
  CHECK(g->Lock(LockMode::kShared).kind() == ErrorKind::kBusy);
  // And after qemu-io is gone, the image is ours.
  q.Stop();
  REQUIRE(WaitUntil([&] { return LockedBytes(img).empty(); }, 10));
  auto h = Open(img, OpenMode::kReadWrite);
  CHECK(h->Lock(LockMode::kExclusive).ok());
}

TEST_CASE("while qemu-io -r holds the image, we may share it but not write") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  MakeImage(img);
  QemuIoHolder q(img, /*read_only=*/true);
  REQUIRE_MESSAGE(WaitUntil([&] { return LockedBytes(img).count(201) == 1; }, 20), "qemu-io never locked the image");
  auto f = Open(img, OpenMode::kReadOnly);
  CHECK(f->Lock(LockMode::kShared).ok());
  auto g = Open(img, OpenMode::kReadWrite);
  CHECK(g->Lock(LockMode::kExclusive).kind() == ErrorKind::kBusy);
}

TEST_CASE("while we hold the image, qemu-io cannot take it") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  MakeImage(img);
  auto f = Open(img, OpenMode::kReadWrite);

  SUBCASE("exclusive") {
    REQUIRE(f->Lock(LockMode::kExclusive).ok());
    auto rw = Run("qemu-io -f qcow2 -c 'read 0 512' " + Sh(img));
    CHECK(rw.exit_code != 0);
    CHECK_MESSAGE((rw.err + rw.out).find("lock") != std::string::npos, rw.err, rw.out);
    auto ro = Run("qemu-io -r -f qcow2 -c 'read 0 512' " + Sh(img));
    CHECK(ro.exit_code != 0);
    CHECK_MESSAGE((ro.err + ro.out).find("lock") != std::string::npos, ro.err, ro.out);
    // Force-share still reads, as qemu-img -U promises.
    CHECK(Run("qemu-img info -U " + Sh(img)).exit_code == 0);
  }
  SUBCASE("shared") {
    REQUIRE(f->Lock(LockMode::kShared).ok());
    auto ro = Run("qemu-io -r -f qcow2 -c 'read 0 512' " + Sh(img));
    CHECK_MESSAGE(ro.exit_code == 0, ro.err, ro.out);
    CHECK((ro.err + ro.out).find("lock") == std::string::npos);
    auto rw = Run("qemu-io -f qcow2 -c 'read 0 512' " + Sh(img));
    CHECK(rw.exit_code != 0);
    CHECK_MESSAGE((rw.err + rw.out).find("lock") != std::string::npos, rw.err, rw.out);
  }
  SUBCASE("released when closed") {
    REQUIRE(f->Lock(LockMode::kExclusive).ok());
    f.reset();
    auto rw = Run("qemu-io -f qcow2 -c 'read 0 512' " + Sh(img));
    CHECK_MESSAGE(rw.exit_code == 0, rw.err);
  }
}
