// Stock QEMU tools as judges (qemu-img check/info/compare, qemu-io), and
// background processes for tests that hold an image open in another program.
#pragma once

#include <sys/types.h>

#include <nlohmann/json.hpp>
#include <string>

#include "support/process.h"

namespace testing {

struct QemuCheckResult {
  int exit_code = -1;
  nlohmann::json json;  // null if the output was not JSON
  std::string out, err;
  uint64_t Get(const char* key) const { return json.is_object() && json.contains(key) ? json[key].get<uint64_t>() : 0; }
};

// qemu-img check -f qcow2 --output=json [-r leaks|all] PATH
QemuCheckResult QemuImgCheck(const std::string& path, const std::string& repair = "");
// qemu-img info -f qcow2 --output=json PATH; null json on failure (see r).
nlohmann::json QemuImgInfo(const std::string& path, RunResult* r = nullptr);
// qemu-img compare -f qcow2 -F raw IMG RAW (exit 0: identical).
RunResult QemuImgCompare(const std::string& image, const std::string& raw);

// Asserts (doctest CHECK) that qemu-img check exits 0 with no leaks,
// corruptions or check errors, and that qemu-img info accepts the image.
void CheckQemuClean(const std::string& path, const std::string& compat = "1.1");

// L2 entries of the active L1 of a version 2 image (read straight from the
// file) that carry COPIED on a cluster other entries reference too: QEMU
// would write into such a cluster in place, under the other entry.
uint64_t UnsafeCopiedEntries(const std::string& path);
// Asserts that qemu-img compare says image and raw are identical.
void CheckQemuIdentical(const std::string& image, const std::string& raw);

// Whether someone holds QEMU's write lock on image: /proc/locks lists a
// lock on byte 201 ("refuses to share write") of the file's inode.
bool HoldsQemuLock(const std::string& image);

// Number of lines in s (a final newline does not start a new line).
int LineCount(const std::string& s);

// A shell command running in its own process group; killed (the whole group,
// by its id) when the object goes away if it is still running.
class BackgroundProcess {
 public:
  explicit BackgroundProcess(const std::string& cmd);
  ~BackgroundProcess();
  BackgroundProcess(const BackgroundProcess&) = delete;
  BackgroundProcess& operator=(const BackgroundProcess&) = delete;
  bool Running();
  // Exit code, or -1 if it still runs after timeout_seconds.
  int Wait(double timeout_seconds);
  void Kill();
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  int status_ = 0;
};

// Polls pred every 20 ms for up to timeout_seconds; true once it holds.
template <class Pred>
bool WaitFor(Pred pred, double timeout_seconds);

}  // namespace testing

#include <chrono>
#include <thread>

template <class Pred>
bool testing::WaitFor(Pred pred, double timeout_seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_seconds);
  for (;;) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}
