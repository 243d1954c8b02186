// write --input at its edges, judged by qemu-img: a stream (FIFO, character
// device, pipe) is read only as far as the write can use and refused whole
// when it is longer; a file that shrinks while it is read leaves exactly
// the bytes the message names, the rest of the range unchanged.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <random>
#include <string>

#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

constexpr uint64_t kMiB = 1 << 20;

std::string RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = char(rng());
  return s;
}

void MustRun(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

// A 10 MiB image whose every byte is 0x11, so that "unchanged" shows.
std::string MakeImage(const TempDir& dir) {
  const std::string img = dir / "img.qcow2";
  MustRun(Tool() + " create -q " + Sh(img) + " 10M && " + Tool() + " write --pattern 0x11 --length 10M " + Sh(img) +
          " 0");
  return img;
}

}  // namespace

TEST_CASE("write --input from an endless stream reads only the room before the virtual size, then fails") {
  RequireCommand("qemu-img");
  TempDir dir;
  const std::string img = MakeImage(dir), fifo = dir / "fifo";
  const std::string before = ReadFileBytes(img);
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // 1 MiB of room at 9M; the feeder never stops on its own.
  BackgroundProcess write(Tool() + " write --input " + Sh(fifo) + " " + Sh(img) + " 9M 2>" + Sh(dir / "err"));
  int fd = -1;
  REQUIRE(WaitFor([&] { return (fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)) >= 0; }, 20));
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  ::signal(SIGPIPE, SIG_IGN);  // the reader goes away: write fails with EPIPE
  const std::string block(64 << 10, '\x5a');
  uint64_t fed = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (fed < 256 * kMiB) {  // far beyond any sane bound: a runaway reader fails below
    ssize_t n = ::write(fd, block.data(), block.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    fed += uint64_t(n);
  }
  ::close(fd);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(write.Wait(30) == 1);
  const std::string err = ReadFileBytes(dir / "err");
  INFO("stderr: " << err << "fed " << fed << " bytes in " << secs << " s");
  // Read: the 1 MiB of room and the byte after it; what the pipe and our
  // last block held on top of that is all the slack there is.
  CHECK(fed <= kMiB + (1 << 20));
  CHECK(secs < 10);
  CHECK(LineCount(err) == 1);
  CHECK(err.find("it is longer than the 1048576 bytes left before the virtual size 10485760 (nothing was written)") !=
        std::string::npos);
  CHECK(ReadFileBytes(img) == before);
}

TEST_CASE("write --input /dev/zero is refused at once, the image untouched") {
  RequireCommand("qemu-img");
  TempDir dir;
  const std::string img = MakeImage(dir);
  const std::string before = ReadFileBytes(img);
  // timeout: without the bound this ran until /tmp was full.
  RunResult r = Run("timeout 60 " + Tool() + " write --input /dev/zero " + Sh(img) + " 0");
  INFO(r.err);
  CHECK(r.exit_code == 1);
  CHECK(LineCount(r.err) == 1);
  CHECK(r.err.find("longer than the 10485760 bytes left") != std::string::npos);
  CHECK(ReadFileBytes(img) == before);
  CheckQemuClean(img);
}

TEST_CASE("a stream that fits exactly is written whole") {
  RequireCommand("qemu-img");
  TempDir dir;
  const std::string img = MakeImage(dir);
  const std::string data = RandomBytes(kMiB, 3);
  WriteFileBytes(dir / "data", data);
  MustRun("cat " + Sh(dir / "data") + " | " + Tool() + " write --input - " + Sh(img) + " 9M");
  std::string expect(10 * kMiB, '\x11');
  expect.replace(9 * kMiB, kMiB, data);
  WriteFileBytes(dir / "expect.raw", expect);
  CheckQemuIdentical(img, dir / "expect.raw");
  CheckQemuClean(img);
}

TEST_CASE("an input file that shrinks while it is read: the message names the bytes written, and only those are") {
  RequireCommand("qemu-img");
  TempDir dir;
  const std::string input = dir / "input";
  const std::string data = RandomBytes(8 * kMiB, 4);
  const uint64_t cut = 4 * kMiB + 1000;  // inside the second 4 MiB chunk
  // We cut the file as soon as the write has read its first chunk (inotify
  // tells us): if our cut comes after the write's second read, the write
  // simply succeeds, and we try again.
  RunResult r{-1, "", ""};
  std::string img;
  for (int attempt = 0; attempt < 5 && r.exit_code != 1; ++attempt) {
    CAPTURE(attempt);
    img = MakeImage(dir);
    WriteFileBytes(input, data);
    const int in = ::inotify_init1(IN_CLOEXEC);
    REQUIRE(in >= 0);
    REQUIRE(::inotify_add_watch(in, input.c_str(), IN_ACCESS) >= 0);
    BackgroundProcess write(Tool() + " write --input " + Sh(input) + " " + Sh(img) + " 0 2>" + Sh(dir / "err"));
    pollfd p{in, POLLIN, 0};
    const bool read_once = ::poll(&p, 1, 30000) == 1;
    if (read_once) REQUIRE(::truncate(input.c_str(), off_t(cut)) == 0);
    ::close(in);
    REQUIRE(read_once);
    r.exit_code = write.Wait(60);
    r.err = ReadFileBytes(dir / "err");
  }
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 1);
  CHECK(LineCount(r.err) == 1);
  CHECK(r.err.find("the input ended after 4195304 of its 8388608 bytes (did it shrink while it was read?); the "
                   "first 4194304 bytes (offset 0 to 4194304) were written, the rest of the range is unchanged") !=
        std::string::npos);
  // Closed clean, and holding what the message says.
  CheckQemuClean(img);
  std::string expect(10 * kMiB, '\x11');
  expect.replace(0, 4 * kMiB, data.substr(0, 4 * kMiB));
  WriteFileBytes(dir / "expect.raw", expect);
  CheckQemuIdentical(img, dir / "expect.raw");
}
