// A File held in memory: for fuzzing and for tests that need no disk.
#pragma once

#include <cstring>
#include <mutex>
#include <vector>

#include "qcow2dedup/file.h"

namespace testing {

class MemoryFile final : public qcow2dedup::File {
 public:
  explicit MemoryFile(std::vector<uint8_t> bytes, std::string name = "memory")
      : bytes_(std::move(bytes)), name_(std::move(name)) {}

  qcow2dedup::Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override {
    std::lock_guard<std::mutex> l(mu_);
    if (buf.empty()) return qcow2dedup::Status::Ok();
    size_t n = offset >= bytes_.size() ? 0 : std::min<uint64_t>(buf.size(), bytes_.size() - offset);
    if (n) std::memcpy(buf.data(), bytes_.data() + offset, n);
    std::memset(buf.data() + n, 0, buf.size() - n);
    return qcow2dedup::Status::Ok();
  }
  qcow2dedup::Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    std::lock_guard<std::mutex> l(mu_);
    // No overflow of offset + size; no memcpy from a null pointer (an empty span).
    if (offset > kMaxSize || data.size() > kMaxSize - offset) return qcow2dedup::Status::NoSpace("memory file full");
    if (data.empty()) return qcow2dedup::Status::Ok();
    if (offset + data.size() > bytes_.size()) bytes_.resize(offset + data.size());
    std::memcpy(bytes_.data() + offset, data.data(), data.size());
    return qcow2dedup::Status::Ok();
  }
  qcow2dedup::Status Sync() override { return qcow2dedup::Status::Ok(); }
  qcow2dedup::Result<uint64_t> Size() override {
    std::lock_guard<std::mutex> l(mu_);
    return uint64_t(bytes_.size());
  }
  qcow2dedup::Status Truncate(uint64_t size) override {
    std::lock_guard<std::mutex> l(mu_);
    if (size > kMaxSize) return qcow2dedup::Status::NoSpace("memory file full");
    bytes_.resize(size);
    return qcow2dedup::Status::Ok();
  }
  // A hole reads as zero, so a punch of live data shows up as lost data.
  qcow2dedup::Status PunchHole(uint64_t offset, uint64_t len) override {
    std::lock_guard<std::mutex> l(mu_);
    if (offset < bytes_.size()) std::memset(bytes_.data() + offset, 0, std::min<uint64_t>(len, bytes_.size() - offset));
    return qcow2dedup::Status::Ok();
  }
  qcow2dedup::Status Lock(qcow2dedup::LockMode) override { return qcow2dedup::Status::Ok(); }
  const std::string& name() const override { return name_; }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  static constexpr uint64_t kMaxSize = 1ull << 32;
  std::mutex mu_;
  std::vector<uint8_t> bytes_;
  std::string name_;
};

}  // namespace testing
