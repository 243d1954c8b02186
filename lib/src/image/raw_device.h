// A raw file or block device as a BlockDevice.
#pragma once

#include <memory>

#include "qcow2dedup/image.h"

namespace qcow2dedup {

class RawDevice final : public BlockDevice {
 public:
  RawDevice(std::unique_ptr<File> file, uint64_t size) : file_(std::move(file)), size_(size) {}
  uint64_t virtual_size() const override { return size_; }
  std::string format() const override { return "raw"; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override {
    if (offset > size_ || buf.size() > size_ - offset)
      return Status::InvalidArgument("read beyond the end of the device");
    return file_->ReadAt(offset, buf);
  }
  void Prefetch(uint64_t offset, uint64_t len) override { file_->Prefetch(offset, len); }
  Result<uint64_t> ZeroRun(uint64_t offset) override {
    QD_ASSIGN_OR_RETURN(uint64_t next, file_->NextData(offset));
    return std::min(next, size_) - std::min(offset, std::min(next, size_));
  }

 private:
  std::unique_ptr<File> file_;
  uint64_t size_;
};

}  // namespace qcow2dedup
