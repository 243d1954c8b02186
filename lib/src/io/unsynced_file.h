// A file whose Sync does nothing: qemu-img's cache=unsafe. Writes still
// reach the page cache in order, so a killed process leaves what the
// ordered path would; only a power cut or an OS crash can lose them.
#pragma once

#include <memory>

#include "qcow2dedup/file.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup {

class UnsyncedFile final : public File {
 public:
  explicit UnsyncedFile(std::unique_ptr<File> inner) : inner_(std::move(inner)) {}
  Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override { return inner_->ReadAt(offset, buf); }
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override { return inner_->WriteAt(offset, data); }
  Status Sync() override { return Status::Ok(); }
  Result<uint64_t> Size() override { return inner_->Size(); }
  Status Truncate(uint64_t size) override { return inner_->Truncate(size); }
  Status PunchHole(uint64_t offset, uint64_t len) override { return inner_->PunchHole(offset, len); }
  Status Lock(LockMode mode) override { return inner_->Lock(mode); }
  Result<uint64_t> NextData(uint64_t offset) override { return inner_->NextData(offset); }
  void Prefetch(uint64_t offset, uint64_t len) override { inner_->Prefetch(offset, len); }
  const std::string& name() const override { return inner_->name(); }

 private:
  std::unique_ptr<File> inner_;
};

// file as cache mode unsafe wants it (wrapped once, however often asked).
inline std::unique_ptr<File> WithCacheMode(std::unique_ptr<File> file, CacheMode cache) {
  if (cache != CacheMode::kUnsafe || dynamic_cast<UnsyncedFile*>(file.get())) return file;
  return std::make_unique<UnsyncedFile>(std::move(file));
}

}  // namespace qcow2dedup
