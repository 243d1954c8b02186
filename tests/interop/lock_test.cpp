// QEMU's image locking, both ways: while qemu-io holds an image our
// writers refuse it (non-zero exit, one line saying it is in use, the file
// untouched), and while we write an image qemu-io cannot open it.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <thread>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

bool MentionsLock(const std::string& err) {
  const std::string e = Lower(err);
  return e.find("in use") != std::string::npos || e.find("lock") != std::string::npos;
}


std::string Digest(const std::string& bytes) {
  return std::to_string(bytes.size()) + " bytes, hash " + std::to_string(std::hash<std::string>{}(bytes));
}

// An image of ours with some data, and a raw file to convert from.
void MakeImages(const TempDir& dir) {
  RunResult r = Run("head -c 1M /dev/urandom >" + Sh(dir / "src.raw") + " && " + Tool() + " convert -q " +
                    Sh(dir / "src.raw") + " " + Sh(dir / "img.qcow2"));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

// Runs cmd against an image someone else holds: it must fail with one line
// that says so, and leave the image as it was.
void ExpectRefused(const std::string& image, const std::string& cmd) {
  // A QEMU holder rewrites the header (clearing our autoclear bit) just
  // after it takes its locks: wait until the file stops changing.
  std::string before = ReadFileBytes(image);
  for (int i = 0; i < 50; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::string again = ReadFileBytes(image);
    if (again == before) break;
    before = std::move(again);
  }
  const auto t0 = std::chrono::steady_clock::now();
  RunResult r = Run(cmd);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(cmd << "\nexit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code != 0);
  CHECK(LineCount(r.err) == 1);
  CHECK(MentionsLock(r.err));
  CHECK(r.out.empty());
  CHECK(secs < 10);  // refused at once, not after waiting
  const std::string after = ReadFileBytes(image);
  const bool unchanged = after == before;
  CHECK_MESSAGE(unchanged, "the image changed: " << Digest(before) << " before, " << Digest(after) << " after");
}

// The write end of a fifo that a background process reads; opened without
// blocking forever if the reader never comes.
class FifoWriter {
 public:
  FifoWriter(const std::string& path, double timeout_seconds) {
    WaitFor(
        [&] {
          fd_ = ::open(path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
          return fd_ >= 0;  // ENXIO until the reader has it open
        },
        timeout_seconds);
    if (fd_ >= 0) ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) & ~O_NONBLOCK);
  }
  ~FifoWriter() { Close(); }
  bool ok() const { return fd_ >= 0; }
  bool Write(const std::string& data) {
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::write(fd_, data.data() + done, data.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      done += size_t(n);
    }
    return true;
  }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

}  // namespace

TEST_CASE("while qemu-io holds an image, our writers refuse it") {
  REQUIRE(HaveCommand("qemu-io"));
  TempDir dir;
  MakeImages(dir);
  const std::string img = dir / "img.qcow2";
  std::string holder_cmd;
  SUBCASE("qemu-io read-write") { holder_cmd = "qemu-io -f qcow2 " + Sh(img); }
  SUBCASE("qemu-io read-only (it still refuses to share write)") { holder_cmd = "qemu-io -r -f qcow2 " + Sh(img); }
  CAPTURE(holder_cmd);

  {
    // qemu-io waits for commands on its standard input, which stays open
    // (and empty) for as long as sleep runs; the group is killed below.
    BackgroundProcess holder("sleep 300 | " + holder_cmd + " >" + Sh(dir / "holder.log") + " 2>&1");
    INFO("qemu-io: " << ReadFileBytes(dir / "holder.log"));
    REQUIRE_MESSAGE(WaitFor([&] { return HoldsQemuLock(img); }, 30), "qemu-io never took the image's lock");

    ExpectRefused(img, Tool() + " write --pattern 0x11 --length 4096 " + Sh(img) + " 0");
    {
      // The refusal names the holder, as /proc tells it.
      RunResult r = Run(Tool() + " write --pattern 0x11 --length 4096 " + Sh(img) + " 0");
      INFO(r.err);
      CHECK(r.err.find(": the image is in use: qemu-io (pid ") != std::string::npos);
      CHECK(r.err.find(") holds its lock\n") != std::string::npos);
    }
    ExpectRefused(img, "head -c 70000 /dev/urandom | " + Tool() + " write --input - " + Sh(img) + " 65536");
    ExpectRefused(img, Tool() + " convert --force " + Sh(dir / "src.raw") + " " + Sh(img));
    ExpectRefused(img, "head -c 100000 /dev/urandom | " + Tool() + " convert --force - " + Sh(img));
    ExpectRefused(img, Tool() + " dedup " + Sh(img));
    CHECK(holder.Running());
    holder.Kill();
  }

  // The lock was the only obstacle.
  REQUIRE(WaitFor([&] { return !HoldsQemuLock(img); }, 30));
  RunResult r = Run(Tool() + " write --pattern 0x11 --length 4096 " + Sh(img) + " 0");
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CheckQemuClean(img);
}

TEST_CASE("while we write an image, QEMU cannot open it") {
  REQUIRE(HaveCommand("qemu-io"));
  TempDir dir;
  const std::string img = dir / "img.qcow2", fifo = dir / "fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  std::mt19937_64 rng(42);
  std::string data(1 << 20, '\0');
  for (auto& c : data) c = char(rng());

  // convert from standard input, fed by us through a fifo: it holds the
  // image for as long as we keep the fifo open.
  BackgroundProcess convert(Tool() + " convert - " + Sh(img) + " <" + Sh(fifo) + " 2>" + Sh(dir / "convert.err"));
  {
    FifoWriter feed(fifo, 20);
    REQUIRE_MESSAGE(feed.ok(), "convert never opened its standard input");
    REQUIRE(feed.Write(data));  // returns once convert has read all but a pipe's worth
    REQUIRE_MESSAGE(WaitFor([&] { return HoldsQemuLock(img); }, 30), "convert never took the image's lock");

    RunResult r = Run("qemu-io -f qcow2 -c 'read 0 512' " + Sh(img));
    INFO("qemu-io: exit " << r.exit_code << "\n" << r.out << r.err);
    CHECK(r.exit_code != 0);
    CHECK(r.err.find("Failed to get") != std::string::npos);
    CHECK(r.err.find("lock") != std::string::npos);
    CHECK(r.out.find("read 512/512") == std::string::npos);

    r = Run("qemu-io -r -f qcow2 -c 'read 0 512' " + Sh(img));
    INFO("qemu-io -r: exit " << r.exit_code << "\n" << r.out << r.err);
    CHECK(r.exit_code != 0);
    CHECK(r.err.find("lock") != std::string::npos);

    r = Run("qemu-img check " + Sh(img));
    INFO("qemu-img check: exit " << r.exit_code << "\n" << r.out << r.err);
    CHECK(r.exit_code != 0);
    CHECK(r.err.find("lock") != std::string::npos);

    // Our own tools keep out of each other's way too.
    const std::string before = ReadFileBytes(img);
    r = Run(Tool() + " write --pattern 0x11 --length 512 " + Sh(img) + " 0");
    INFO("qcow2dedup write: exit " << r.exit_code << "\n" << r.out << r.err);
    CHECK(r.exit_code != 0);
    CHECK(MentionsLock(r.err));
    CHECK(LineCount(r.err) == 1);
    // It names the other qcow2dedup, not QEMU (F_OFD_GETLK cannot tell who
    // holds a lock; the holder's /proc/PID/fdinfo can).
    CHECK(r.err.find("the image is in use: qcow2dedup (pid ") != std::string::npos);
    CHECK(r.err.find("QEMU") == std::string::npos);
    CHECK(ReadFileBytes(img) == before);

    CHECK(convert.Running());
    feed.Close();  // end of input: convert finishes
  }
  const int rc = convert.Wait(60);
  INFO("convert stderr: " << ReadFileBytes(dir / "convert.err"));
  REQUIRE(rc == 0);

  // Now QEMU opens it, and it holds what we fed.
  RunResult r = Run("qemu-io -f qcow2 -c 'read 0 512' " + Sh(img));
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CheckQemuClean(img);
  WriteFileBytes(dir / "data.raw", data);
  CheckQemuIdentical(img, dir / "data.raw");
}
