// What the check tests share: our CheckImage and `qemu-img check` on the
// same file, compared count by count; the guest view as qemu-img exports
// it; and byte-level access to an image, for damaging it on purpose.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "format/header.h"
#include "qcow2dedup/check.h"
#include "qcow2dedup/file.h"
#include "support/qemu_tools.h"

namespace testing {

// CheckImage through the library; the check itself must complete (REQUIRE).
qcow2dedup::CheckReport OurCheck(const std::string& path,
                                 qcow2dedup::RepairMode mode = qcow2dedup::RepairMode::kNone);

// The report's findings, one a line (for failure messages and searches).
std::string Messages(const qcow2dedup::CheckReport& r);
bool HasMessage(const qcow2dedup::CheckReport& r, const std::string& part);

// CHECKs that every count qemu-img reports for the file is ours too.
void SameCountsAsQemu(const qcow2dedup::CheckReport& ours, const QemuCheckResult& q);
// The same, and the same exit code.
void SameAsQemu(const qcow2dedup::CheckReport& ours, const QemuCheckResult& q);

// The guest view, exported to raw_path by qemu-img convert -U -O raw
// (independent of our reader); returns its bytes.
std::string GuestView(const std::string& image, const std::string& raw_path);

void CopyFile(const std::string& from, const std::string& to);  // replaces `to`

// An image's bytes, read and written directly (no lock, no repair), with
// the header as the library parses it. Damage done through it is on disk
// when the call returns. For images without extended L2 entries.
class ImageBytes {
 public:
  explicit ImageBytes(const std::string& path);
  const qcow2dedup::Header& header() const { return h_; }
  uint64_t cluster_size() const { return h_.cluster_size(); }

  uint64_t Get64(uint64_t at);
  void Set64(uint64_t at, uint64_t v);
  std::vector<uint8_t> Read(uint64_t at, size_t n);
  void Write(uint64_t at, std::span<const uint8_t> data);

  // The active L2 entry of guest cluster g (its L2 table must exist).
  uint64_t L2EntryAt(uint64_t g);
  uint64_t L2(uint64_t g) { return Get64(L2EntryAt(g)); }
  void SetL2(uint64_t g, uint64_t entry) { Set64(L2EntryAt(g), entry); }
  uint64_t HostCluster(uint64_t g);     // of guest cluster g's data
  uint64_t L2TableCluster(uint64_t g);  // of the table holding g's entry

  uint64_t Refcount(uint64_t cluster);
  void SetRefcount(uint64_t cluster, uint64_t refcount);

 private:
  uint64_t BlockAt(uint64_t cluster);
  std::unique_ptr<qcow2dedup::File> file_;
  qcow2dedup::Header h_;
};

}  // namespace testing
