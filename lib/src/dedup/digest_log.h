// The full SHA-256 of host clusters whose data this session knows for
// certain (it wrote them, or read and hashed them): what a fingerprint match
// in the index is confirmed against before two clusters are shared.
// At 32 bytes a cluster they would be the largest thing in memory, so they
// live in a scratch file beside the image (the page cache's, not ours),
// the newest ones in a small window first: clusters are mostly allocated in
// ascending order. An all-zero slot is one never written: unknown.
// The log is advisory: where the scratch file fails (a full disk), it knows
// nothing from then on, and every match is confirmed by hashing the data.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "dedup/sha256.h"
#include "qcow2dedup/file.h"

namespace qcow2dedup {

class DigestLog {
 public:
  // The scratch file goes into dir (made on the first Put), else the
  // temporary directory; where neither takes it, memory holds the digests.
  explicit DigestLog(std::string dir) : dir_(std::move(dir)) {}

  // None of these fail: a scratch file that fails is dropped (see above).
  void Put(uint64_t cluster, const Digest& d);
  // Cluster's digest, if known.
  std::optional<Digest> Get(uint64_t cluster);
  // Cluster's data may change from now on (it was freed).
  void Forget(uint64_t cluster);
  // Forgets everything.
  void Clear();

 private:
  static constexpr uint64_t kWindow = 1024;  // slots, 32 KiB
  void Open();
  // Stops using the scratch file after it failed: unknown from now on.
  void Fail();
  Status MoveWindow(uint64_t cluster);
  Status FlushWindow();

  std::string dir_;
  std::unique_ptr<File> file_;
  bool in_memory_ = false;  // no scratch file could be made
  bool failed_ = false;     // the scratch file failed
  std::unordered_map<uint64_t, Digest> memory_;
  uint64_t file_slots_ = 0;  // slots the file holds (past them: holes, zeros)
  uint64_t base_ = 0;        // the window's first slot
  std::vector<Digest> window_;
  uint64_t dirty_lo_ = 0, dirty_hi_ = 0;  // window slots [lo, hi) not in the file yet
};

}  // namespace qcow2dedup
