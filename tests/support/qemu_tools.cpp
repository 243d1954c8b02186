#include "support/qemu_tools.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <fstream>
#include <iterator>
#include <map>
#include <sstream>

namespace testing {

QemuCheckResult QemuImgCheck(const std::string& path, const std::string& repair) {
  QemuCheckResult c;
  RunResult r = Run("qemu-img check -f qcow2 --output=json " + (repair.empty() ? "" : "-r " + repair + " ") + Sh(path));
  c.exit_code = r.exit_code;
  c.out = r.out;
  c.err = r.err;
  c.json = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  if (c.json.is_discarded()) c.json = nullptr;
  return c;
}

nlohmann::json QemuImgInfo(const std::string& path, RunResult* out) {
  RunResult r = Run("qemu-img info -f qcow2 --output=json " + Sh(path));
  if (out) *out = r;
  if (r.exit_code != 0) return nullptr;
  nlohmann::json j = nlohmann::json::parse(r.out, nullptr, false);
  return j.is_discarded() ? nlohmann::json(nullptr) : j;
}

RunResult QemuImgCompare(const std::string& image, const std::string& raw) {
  return Run("qemu-img compare -f qcow2 -F raw " + Sh(image) + " " + Sh(raw));
}

void CheckQemuClean(const std::string& path, const std::string& compat) {
  QemuCheckResult c = QemuImgCheck(path);
  INFO("qemu-img check " << path << "\nstdout: " << c.out << "\nstderr: " << c.err);
  CHECK(c.exit_code == 0);
  REQUIRE(c.json.is_object());
  CHECK(c.Get("check-errors") == 0);
  CHECK(c.Get("leaks") == 0);
  CHECK(c.Get("corruptions") == 0);
  RunResult ir;
  nlohmann::json info = QemuImgInfo(path, &ir);
  INFO("qemu-img info: " << ir.out << ir.err);
  REQUIRE(info.is_object());
  CHECK(info["format"] == "qcow2");
  CHECK(info["dirty-flag"] == false);
  // Version 2 (compat 0.10) has no corrupt bit to report.
  if (compat != "0.10") CHECK(info["format-specific"]["data"]["corrupt"] == false);
  CHECK(info["format-specific"]["data"]["compat"] == compat);
}

void CheckQemuIdentical(const std::string& image, const std::string& raw) {
  RunResult r = QemuImgCompare(image, raw);
  INFO("qemu-img compare " << image << " " << raw << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("Images are identical") != std::string::npos);
}

int LineCount(const std::string& s) {
  if (s.empty()) return 0;
  int n = 0;
  for (char c : s) n += c == '\n';
  return s.back() == '\n' ? n : n + 1;
}

BackgroundProcess::BackgroundProcess(const std::string& cmd) {
  pid_ = ::fork();
  if (pid_ == 0) {
    ::setpgid(0, 0);
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  if (pid_ > 0) ::setpgid(pid_, pid_);  // either side may win the race
}

BackgroundProcess::~BackgroundProcess() { Kill(); }

bool BackgroundProcess::Running() {
  if (pid_ <= 0 || reaped_) return false;
  pid_t r = ::waitpid(pid_, &status_, WNOHANG);
  if (r == pid_) reaped_ = true;
  return !reaped_;
}

int BackgroundProcess::Wait(double timeout_seconds) {
  if (pid_ <= 0) return -1;
  if (!WaitFor([&] { return !Running(); }, timeout_seconds)) return -1;
  return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
}

void BackgroundProcess::Kill() {
  if (pid_ <= 0) return;
  // The group we created (its id is our child's pid): the shell and whatever
  // it started, even after the shell itself has exited.
  ::kill(-pid_, SIGKILL);
  if (!reaped_) {
    ::waitpid(pid_, &status_, 0);
    reaped_ = true;
  }
}

bool HoldsQemuLock(const std::string& image) {
  struct stat st;
  if (::stat(image.c_str(), &st) != 0) return false;
  std::ifstream in("/proc/locks");
  std::stringstream locks;
  locks << in.rdbuf();
  const std::string inode = ":" + std::to_string(st.st_ino) + " ";
  for (std::string line; std::getline(locks, line);)
    if (line.find(inode) != std::string::npos && line.find(" 201 201") != std::string::npos) return true;
  return false;
}

}  // namespace testing

namespace testing {

uint64_t UnsafeCopiedEntries(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string f((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto be = [&](uint64_t at, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n && at + i < f.size(); ++i) v = v << 8 | uint8_t(f[at + i]);
    return v;
  };
  REQUIRE(f.size() >= 72);
  REQUIRE(be(4, 4) == 2);
  const uint64_t cs = uint64_t(1) << be(20, 4), l1_size = be(36, 4), l1 = be(40, 8);
  constexpr uint64_t kOffset = 0x00fffffffffffe00ull;
  std::map<uint64_t, int> refs;
  std::vector<uint64_t> copied;
  for (uint64_t i = 0; i < l1_size; ++i) {
    const uint64_t table = be(l1 + 8 * i, 8) & kOffset;
    if (!table) continue;
    REQUIRE(table + cs <= f.size());
    for (uint64_t j = 0; j < cs / 8; ++j) {
      const uint64_t e = be(table + 8 * j, 8);
      if ((e >> 62) & 1 || !(e & kOffset)) continue;  // compressed, or unallocated
      ++refs[e & kOffset];
      if (e >> 63) copied.push_back(e & kOffset);
    }
  }
  uint64_t unsafe = 0;
  for (uint64_t c : copied) unsafe += refs[c] != 1;
  return unsafe;
}

}  // namespace testing
