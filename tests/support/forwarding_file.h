// A File that passes every call to another: tests derive from it and
// override only the calls they count, log or fail.
#pragma once

#include <memory>

#include "qcow2dedup/file.h"

namespace testing {

class ForwardingFile : public qcow2dedup::File {
 public:
  explicit ForwardingFile(std::unique_ptr<qcow2dedup::File> inner) : inner_(std::move(inner)) {}

  qcow2dedup::Status ReadAt(uint64_t o, std::span<uint8_t> b) override { return inner_->ReadAt(o, b); }
  qcow2dedup::Status WriteAt(uint64_t o, std::span<const uint8_t> d) override { return inner_->WriteAt(o, d); }
  qcow2dedup::Status Sync() override { return inner_->Sync(); }
  qcow2dedup::Result<uint64_t> Size() override { return inner_->Size(); }
  qcow2dedup::Status Truncate(uint64_t s) override { return inner_->Truncate(s); }
  qcow2dedup::Status PunchHole(uint64_t o, uint64_t n) override { return inner_->PunchHole(o, n); }
  qcow2dedup::Status Lock(qcow2dedup::LockMode m) override { return inner_->Lock(m); }
  qcow2dedup::Result<uint64_t> NextData(uint64_t o) override { return inner_->NextData(o); }
  void Prefetch(uint64_t o, uint64_t n) override { inner_->Prefetch(o, n); }
  qcow2dedup::Status ReadUncached(uint64_t o, std::span<uint8_t> b) override { return inner_->ReadUncached(o, b); }
  std::optional<qcow2dedup::FileStamp> Stamp() override { return inner_->Stamp(); }
  const std::string& name() const override { return inner_->name(); }

 private:
  std::unique_ptr<qcow2dedup::File> inner_;
};

}  // namespace testing
