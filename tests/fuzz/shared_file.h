// A File that forwards to a MemoryFile the fuzz target keeps: the library
// owns (and destroys) the File it is given, the target still reads the
// bytes afterwards.
#pragma once

#include <memory>

#include "support/memory_file.h"

namespace testing {

class SharedFile final : public qcow2dedup::File {
 public:
  explicit SharedFile(std::shared_ptr<MemoryFile> f) : f_(std::move(f)) {}
  qcow2dedup::Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override { return f_->ReadAt(offset, buf); }
  qcow2dedup::Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    return f_->WriteAt(offset, data);
  }
  qcow2dedup::Status Sync() override { return f_->Sync(); }
  qcow2dedup::Result<uint64_t> Size() override { return f_->Size(); }
  qcow2dedup::Status Truncate(uint64_t size) override { return f_->Truncate(size); }
  qcow2dedup::Status Lock(qcow2dedup::LockMode mode) override { return f_->Lock(mode); }
  qcow2dedup::Result<uint64_t> NextData(uint64_t offset) override { return f_->NextData(offset); }
  const std::string& name() const override { return f_->name(); }

 private:
  std::shared_ptr<MemoryFile> f_;
};

}  // namespace testing
