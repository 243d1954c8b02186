// Guest data on its way to new host clusters, gathered into long writes:
// a convert allocates clusters one after another, and one pwrite of a few
// MiB costs far less than hundreds of small ones.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "qcow2dedup/file.h"

namespace qcow2dedup {

class DataWriter {
 public:
  explicit DataWriter(File* file) : file_(file) {}

  Status Write(uint64_t offset, std::span<const uint8_t> data) {
    if (!buf_.empty() && (offset != start_ + buf_.size() || buf_.size() >= kMaxRun))
      QD_RETURN_IF_ERROR(Flush());
    if (buf_.empty()) start_ = offset;
    buf_.insert(buf_.end(), data.begin(), data.end());
    return Status::Ok();
  }

  // Sends what is gathered to the file (no sync).
  Status Flush() {
    if (buf_.empty()) return Status::Ok();
    Status s = file_->WriteAt(start_, buf_);
    buf_.clear();
    return s;
  }

  bool Overlaps(uint64_t offset, uint64_t len) const {
    return !buf_.empty() && offset < start_ + buf_.size() && offset + len > start_;
  }

 private:
  // Not more: on Linux 6.x, buffered writes of 2 MiB and up cost ten times
  // the CPU per byte of 1 MiB ones (dd bs=4M vs bs=1M), likely large-folio
  // allocation in the page cache.
  static constexpr size_t kMaxRun = 1u << 20;
  File* file_;
  uint64_t start_ = 0;
  std::vector<uint8_t> buf_;
};

}  // namespace qcow2dedup
