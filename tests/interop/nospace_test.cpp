// A full file system, for real: a small tmpfs (mounting needs root; the
// test is skipped without it). `convert` onto it fails with one clear line
// and leaves no destination behind; `write` into an image on it fails with
// one clear line, and once there is space again `check -r all` repairs the
// image, every guest cluster holds its old or its new data, and writing
// works again.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using testing::Run;
using testing::RunResult;
using testing::Sh;
using testing::TempDir;
using testing::Tool;
namespace fs = std::filesystem;

namespace {

using Bytes = std::string;

// A tmpfs of the given size mounted on dir for the object's lifetime;
// unmounted on every path out (lazily, should something still use it).
class Tmpfs {
 public:
  Tmpfs(const std::string& dir, const std::string& size) : dir_(dir) {
    fs::create_directories(dir_);
    RunResult r = Run("mount -t tmpfs -o size=" + size + " tmpfs " + Sh(dir_));
    error_ = r.err;
    mounted_ = r.exit_code == 0;
  }
  ~Tmpfs() {
    if (mounted_ && Run("umount " + Sh(dir_)).exit_code != 0) Run("umount -l " + Sh(dir_));
  }
  Tmpfs(const Tmpfs&) = delete;
  Tmpfs& operator=(const Tmpfs&) = delete;
  bool mounted() const { return mounted_; }
  const std::string& error() const { return error_; }
  uint64_t FreeBytes() const {
    struct statvfs st;
    REQUIRE(::statvfs(dir_.c_str(), &st) == 0);
    return uint64_t(st.f_bavail) * st.f_frsize;
  }

 private:
  std::string dir_, error_;
  bool mounted_ = false;
};

// Mounting needs root; without it the test has nothing to say.
bool CanMount() {
  if (::geteuid() == 0) return true;
  MESSAGE("skipped: mounting a tmpfs needs root");
  return false;
}

Bytes Random(uint64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n, '\0');
  for (uint64_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    std::memcpy(&b[i], &v, std::min<uint64_t>(8, n - i));
  }
  return b;
}

Bytes Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  Bytes b(size_t(std::max<std::streamoff>(0, f.tellg())), '\0');
  f.seekg(0);
  f.read(b.data(), std::streamsize(b.size()));
  return b;
}

void Spit(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(b.data(), std::streamsize(b.size()));
  REQUIRE(f.good());
}

// Writes random bytes to path until the file system is full, or until only
// leave bytes are free; returns how much it wrote.
uint64_t Fill(const std::string& path, const Tmpfs& t, uint64_t leave) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  REQUIRE(fd >= 0);
  const Bytes chunk = Random(64 << 10, 99);
  uint64_t written = 0;
  for (;;) {
    const uint64_t free_now = t.FreeBytes();
    if (free_now <= leave) break;
    const size_t n = size_t(std::min<uint64_t>(chunk.size(), free_now - leave));
    ssize_t w = ::write(fd, chunk.data(), n);
    if (w < 0 && errno == ENOSPC) break;
    REQUIRE_MESSAGE(w > 0, "filling the file system: ", std::strerror(errno));
    written += uint64_t(w);
  }
  ::close(fd);
  return written;
}

// A failure reported as one stderr line "qcow2dedup: ...", about space.
void CheckNoSpaceMessage(const RunResult& r, const std::string& what) {
  INFO(what << ": exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code < 128);
  CHECK(testing::LineCount(r.err) == 1);
  CHECK(r.err.rfind("qcow2dedup:", 0) == 0);
  const bool says_space =
      r.err.find("No space left on device") != std::string::npos || r.err.find("no space") != std::string::npos;
  CHECK_MESSAGE(says_space, "the message does not say the disk is full");
}

}  // namespace

TEST_CASE("convert onto a full file system: one clear line, and no destination left behind") {
  if (!CanMount()) return;
  TempDir dir;
  const std::string mnt = dir / "mnt";
  const std::string src = dir / "src.raw";
  // 32 MiB of random data: neither compressible nor deduplicable.
  Spit(src, Random(32 << 20, 1));
  Tmpfs t(mnt, "8M");
  REQUIRE_MESSAGE(t.mounted(), "mount -t tmpfs failed: ", t.error());
  const uint64_t free_before = t.FreeBytes();

  struct Case {
    std::string name, cmd, dst;
  };
  const std::vector<Case> cases = {
      {"convert to qcow2 (64K clusters)", Tool() + " convert -f raw " + Sh(src) + " " + Sh(mnt + "/a.qcow2"),
       mnt + "/a.qcow2"},
      {"convert to qcow2 (4K clusters)",
       Tool() + " convert -f raw -o cluster_size=4K " + Sh(src) + " " + Sh(mnt + "/b.qcow2"), mnt + "/b.qcow2"},
      {"convert from standard input", "cat " + Sh(src) + " | " + Tool() + " convert - " + Sh(mnt + "/c.qcow2"),
       mnt + "/c.qcow2"},
      {"convert to raw", Tool() + " convert -O raw " + Sh(src) + " " + Sh(mnt + "/d.raw"), mnt + "/d.raw"},
  };
  for (const Case& c : cases) {
    RunResult r = Run(c.cmd);
    CheckNoSpaceMessage(r, c.name);
    // The destination this run created is gone, so nothing can pass for a
    // finished image; its space is free again.
    CHECK_MESSAGE(!fs::exists(c.dst), c.name, ": the failed convert left ", c.dst);
    if (fs::exists(c.dst)) {
      RunResult info = Run("qemu-img info --output=json " + Sh(c.dst));
      RunResult check = Run("qemu-img check " + Sh(c.dst));
      INFO("qemu-img info: " << info.out << info.err << "\nqemu-img check: " << check.out << check.err);
      CHECK_MESSAGE((info.exit_code != 0 || check.exit_code != 0 ||
                     info.out.find("\"dirty-flag\": true") != std::string::npos),
                    c.name, ": what the failed convert left looks like a finished image");
      fs::remove(c.dst);
    }
    CHECK_MESSAGE(t.FreeBytes() == free_before, c.name, ": the file system did not get its space back");
  }
  // A destination that existed before (with --force) is not ours to delete,
  // but it must not look like a finished image either.
  {
    const std::string dst = mnt + "/e.qcow2";
    REQUIRE(Run(Tool() + " create -q " + Sh(dst) + " 1M").exit_code == 0);
    RunResult r = Run(Tool() + " convert --force -f raw " + Sh(src) + " " + Sh(dst));
    CheckNoSpaceMessage(r, "convert --force over an existing image");
    if (fs::exists(dst)) {
      RunResult info = Run("qemu-img info --output=json " + Sh(dst));
      RunResult check = Run("qemu-img check " + Sh(dst));
      INFO("qemu-img info: " << info.out << info.err << "\nqemu-img check: " << check.out << check.err);
      CHECK_MESSAGE((info.exit_code != 0 || check.exit_code != 0 ||
                     info.out.find("\"dirty-flag\": true") != std::string::npos),
                    "what the failed convert --force left looks like a finished image");
    }
  }
}

TEST_CASE("write into an image on a full file system: one clear line; repaired, old or new data") {
  if (!CanMount()) return;
  TempDir dir;
  const std::string mnt = dir / "mnt";
  constexpr uint64_t kCluster = 4096, kSize = 6 << 20;
  // Old data: 2 MiB random, some of it twice, then zeros.
  Bytes old(kSize, '\0');
  {
    Bytes r = Random(2 << 20, 2);
    std::memcpy(&old[0], r.data(), r.size());
    std::memcpy(&old[3 << 20], r.data(), 256 << 10);  // shared clusters
  }
  const std::string old_raw = dir / "old.raw";
  Spit(old_raw, old);
  // New data: 3 MiB random at 1 MiB + 512 (over old, shared and zero clusters).
  const uint64_t at = (1 << 20) + 512;
  const Bytes input = Random(3 << 20, 3);
  const std::string input_path = dir / "new.bin";
  Spit(input_path, input);
  Bytes fresh = old;
  fresh.replace(at, input.size(), input);

  // Leave no room at all, then a little (the write fails part way).
  for (uint64_t leave : {uint64_t(0), uint64_t(256 << 10), uint64_t(1 << 20)}) {
    CAPTURE(leave);
    Tmpfs t(mnt, "8M");
    REQUIRE_MESSAGE(t.mounted(), "mount -t tmpfs failed: ", t.error());
    const std::string img = mnt + "/img.qcow2", filler = mnt + "/filler";
    RunResult conv = Run(Tool() + " convert -f raw -o cluster_size=4K " + Sh(old_raw) + " " + Sh(img));
    REQUIRE_MESSAGE(conv.exit_code == 0, conv.err);
    Fill(filler, t, leave);

    RunResult r = Run(Tool() + " write --input " + Sh(input_path) + " " + Sh(img) + " " + std::to_string(at));
    CheckNoSpaceMessage(r, "write on a full file system");
    // The space the failed write took is given back at once: the file holds
    // no more than the image (up to its end) and its dedup index.
    {
      struct stat st;
      REQUIRE(::stat(img.c_str(), &st) == 0);
      testing::QemuCheckResult qc = testing::QemuImgCheck(img);
      INFO("qemu-img check after the failed write: " << qc.out << qc.err);
      CHECK(qc.exit_code == 0);
      const uint64_t end = qc.Get("image-end-offset");
      CHECK(end > 0);
      CHECK(uint64_t(st.st_blocks) * 512 <= end + (64u << 10));
    }

    // A repair while the disk is still full: it succeeds, or fails with one
    // clear line (and leaves something the next repair can still fix).
    {
      RunResult full = Run(Tool() + " check -r all " + Sh(img));
      INFO("check -r all on the full file system: exit " << full.exit_code << "\n" << full.out << full.err);
      CHECK(full.exit_code < 128);
      if (full.exit_code == 1) {
        CHECK(testing::LineCount(full.err) == 1);
        CHECK(full.err.rfind("qcow2dedup:", 0) == 0);
      }
    }

    // Space again: repair, then qemu-img judges.
    fs::remove(filler);
    RunResult rep = Run(Tool() + " check -r all " + Sh(img));
    INFO("check -r all: exit " << rep.exit_code << "\n" << rep.out << rep.err);
    CHECK(rep.exit_code == 0);
    testing::CheckQemuClean(img);
    const std::string view = dir / "view.raw";
    fs::remove(view);
    RunResult q = Run("qemu-img convert -f qcow2 -O raw " + Sh(img) + " " + Sh(view));
    REQUIRE_MESSAGE(q.exit_code == 0, q.err);
    const Bytes got = Slurp(view);
    REQUIRE(got.size() == kSize);
    uint64_t bad = 0, first_bad = 0;
    for (uint64_t off = 0; off < kSize; off += kCluster) {
      const bool is_old = std::memcmp(&got[off], &old[off], kCluster) == 0;
      const bool is_new = std::memcmp(&got[off], &fresh[off], kCluster) == 0;
      if (!is_old && !is_new && bad++ == 0) first_bad = off / kCluster;
    }
    CHECK_MESSAGE(bad == 0, bad, " guest clusters hold neither old nor new data (first: ", first_bad, ")");
    uint64_t became_new = 0;
    for (uint64_t off = 0; off < kSize; off += kCluster)
      became_new += std::memcmp(&got[off], &old[off], kCluster) != 0;
    MESSAGE("write with ", leave, " bytes free: ", became_new, " clusters hold the new data after the repair");

    // And writing works again: the same write now fits.
    RunResult again = Run(Tool() + " write --input " + Sh(input_path) + " " + Sh(img) + " " + std::to_string(at));
    CHECK_MESSAGE(again.exit_code == 0, again.err);
    const std::string fresh_raw = dir / "fresh.raw";
    Spit(fresh_raw, fresh);
    testing::CheckQemuIdentical(img, fresh_raw);
    testing::CheckQemuClean(img);
  }
}
