#include "support/fault_file.h"

#include <fmt/format.h>

#include <algorithm>
#include <mutex>

namespace testing {

using qcow2dedup::File;
using qcow2dedup::Result;
using qcow2dedup::Status;

namespace {

struct Fault {
  uint64_t at = 0;  // 0: disarmed
  FaultKind kind = FaultKind::kEIO;
  bool sticky = false;
  uint64_t partial = 0;
  bool Fires(uint64_t n) const { return at != 0 && (n == at || (sticky && n > at)); }
};

Status Injected(FaultKind kind, const std::string& what) {
  if (kind == FaultKind::kENOSPC) return Status::NoSpace(what + ": No space left on device (injected)");
  return Status::IOError(what + ": Input/output error (injected)");
}

Status PowerOff() { return Status::IOError("the power is off (FaultFile::PowerCut)"); }

// Where a crash state is built: the base file itself, or bytes in memory.
class Sink {
 public:
  virtual ~Sink() = default;
  virtual Status Write(uint64_t offset, std::span<const uint8_t> data) = 0;
  virtual Status Resize(uint64_t size) = 0;
};

class FileSink final : public Sink {
 public:
  explicit FileSink(File& f) : f_(f) {}
  Status Write(uint64_t offset, std::span<const uint8_t> data) override { return f_.WriteAt(offset, data); }
  Status Resize(uint64_t size) override { return f_.Truncate(size); }

 private:
  File& f_;
};

class MemorySink final : public Sink {
 public:
  explicit MemorySink(std::vector<uint8_t>& b) : b_(b) {}
  Status Write(uint64_t offset, std::span<const uint8_t> data) override {
    if (offset + data.size() > b_.size()) b_.resize(offset + data.size(), 0);
    std::copy(data.begin(), data.end(), b_.begin() + ptrdiff_t(offset));
    return Status::Ok();
  }
  Status Resize(uint64_t size) override {
    b_.resize(size, 0);
    return Status::Ok();
  }

 private:
  std::vector<uint8_t>& b_;
};

// Undoes the log newest first (back to the synced state), then replays the
// operations keep chooses, oldest first.
Status ApplyCrash(Sink& sink, const std::vector<UnsyncedOp>& log, uint64_t synced_size, const KeepFn& keep) {
  for (size_t i = log.size(); i-- > 0;) {
    const UnsyncedOp& op = log[i];
    if (op.kind == UnsyncedOp::kWrite) {
      if (!op.old.empty()) QD_RETURN_IF_ERROR(sink.Write(op.offset, op.old));
      if (op.offset + op.data.size() > op.old_size) QD_RETURN_IF_ERROR(sink.Resize(op.old_size));
    } else {
      QD_RETURN_IF_ERROR(sink.Resize(op.old_size));
      if (!op.old.empty()) QD_RETURN_IF_ERROR(sink.Write(op.offset, op.old));
    }
  }
  QD_RETURN_IF_ERROR(sink.Resize(synced_size));
  if (!keep) return Status::Ok();
  for (size_t i = 0; i < log.size(); ++i) {
    const UnsyncedOp& op = log[i];
    if (!keep(i, op)) continue;
    if (op.kind == UnsyncedOp::kWrite) QD_RETURN_IF_ERROR(sink.Write(op.offset, op.data));
    else QD_RETURN_IF_ERROR(sink.Resize(op.offset));
  }
  return Status::Ok();
}

}  // namespace

struct FaultFile::State {
  mutable std::mutex mu;
  std::unique_ptr<File> base;
  ReopenFn reopen;
  std::string name;
  Fault write_fault, sync_fault, truncate_fault;
  bool fail_reads = false;
  bool powered = true;
  uint64_t reads = 0, writes = 0, syncs = 0, truncates = 0;
  uint64_t failed_writes = 0, failed_syncs = 0, bytes_written = 0;
  uint64_t synced_size = 0;
  std::vector<UnsyncedOp> log;

  // The bytes of [offset, offset + len) that lie inside the file's size.
  Status Capture(uint64_t offset, uint64_t len, uint64_t size, std::vector<uint8_t>& out) {
    out.clear();
    if (offset >= size) return Status::Ok();
    out.resize(std::min(len, size - offset));
    return base->ReadAt(offset, out);
  }
};

FaultFile::FaultFile(std::unique_ptr<File> base, ReopenFn reopen) : s_(std::make_shared<State>()) {
  s_->name = base->name();
  s_->reopen = std::move(reopen);
  auto size = base->Size();
  s_->synced_size = size.ok() ? *size : 0;
  s_->base = std::move(base);
}

FaultFile::FaultFile(std::shared_ptr<State> s) : s_(std::move(s)) {}
FaultFile::~FaultFile() = default;

Result<std::unique_ptr<FaultFile>> FaultFile::Open(const std::string& path) {
  auto reopen = [path]() { return qcow2dedup::OpenPosixFile(path, qcow2dedup::OpenMode::kReadWrite); };
  QD_ASSIGN_OR_RETURN(auto f, reopen());
  return std::make_unique<FaultFile>(std::move(f), reopen);
}

std::unique_ptr<FaultFile> FaultFile::Share() const { return std::unique_ptr<FaultFile>(new FaultFile(s_)); }

Status FaultFile::ReadAt(uint64_t offset, std::span<uint8_t> buf) {
  std::lock_guard lock(s_->mu);
  ++s_->reads;
  if (!s_->powered) return PowerOff();
  if (s_->fail_reads) return Injected(FaultKind::kEIO, fmt::format("read at {:#x}", offset));
  return s_->base->ReadAt(offset, buf);
}

Status FaultFile::WriteAt(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(s_->mu);
  const uint64_t n = ++s_->writes;
  if (!s_->powered) {
    ++s_->failed_writes;
    return PowerOff();
  }
  const bool fail = s_->write_fault.Fires(n);
  if (fail) {
    ++s_->failed_writes;
    data = data.first(std::min<uint64_t>(data.size(), s_->write_fault.partial));
  }
  if (!data.empty()) {
    QD_ASSIGN_OR_RETURN(uint64_t size, s_->base->Size());
    UnsyncedOp op{UnsyncedOp::kWrite, offset, std::vector<uint8_t>(data.begin(), data.end()), size, {}};
    QD_RETURN_IF_ERROR(s_->Capture(offset, data.size(), size, op.old));
    s_->log.push_back(std::move(op));
    Status st = s_->base->WriteAt(offset, data);
    if (!st.ok()) return st;
    s_->bytes_written += data.size();
  }
  if (fail) return Injected(s_->write_fault.kind, fmt::format("write #{} at {:#x}", n, offset));
  return Status::Ok();
}

Status FaultFile::Sync() {
  std::lock_guard lock(s_->mu);
  const uint64_t n = ++s_->syncs;
  if (!s_->powered) {
    ++s_->failed_syncs;
    return PowerOff();
  }
  if (s_->sync_fault.Fires(n)) {
    ++s_->failed_syncs;
    return Injected(s_->sync_fault.kind, fmt::format("sync #{}", n));
  }
  QD_RETURN_IF_ERROR(s_->base->Sync());
  QD_ASSIGN_OR_RETURN(uint64_t size, s_->base->Size());
  s_->synced_size = size;
  s_->log.clear();
  return Status::Ok();
}

Result<uint64_t> FaultFile::Size() {
  std::lock_guard lock(s_->mu);
  if (!s_->powered) return PowerOff();
  return s_->base->Size();
}

Status FaultFile::Truncate(uint64_t size) {
  std::lock_guard lock(s_->mu);
  const uint64_t n = ++s_->truncates;
  if (!s_->powered) return PowerOff();
  if (s_->truncate_fault.Fires(n))
    return Injected(s_->truncate_fault.kind, fmt::format("truncate #{} to {}", n, size));
  QD_ASSIGN_OR_RETURN(uint64_t old_size, s_->base->Size());
  UnsyncedOp op{UnsyncedOp::kTruncate, size, {}, old_size, {}};
  if (size < old_size) QD_RETURN_IF_ERROR(s_->Capture(size, old_size - size, old_size, op.old));
  s_->log.push_back(std::move(op));
  return s_->base->Truncate(size);
}

Status FaultFile::PunchHole(uint64_t offset, uint64_t len) {
  QD_ASSIGN_OR_RETURN(uint64_t size, Size());
  if (offset >= size) return Status::Ok();
  len = std::min(len, size - offset);
  std::vector<uint8_t> zeros(std::min<uint64_t>(len, 1u << 20), 0);
  for (uint64_t done = 0; done < len; done += zeros.size())
    QD_RETURN_IF_ERROR(WriteAt(offset + done, std::span(zeros).first(std::min<uint64_t>(zeros.size(), len - done))));
  return Status::Ok();
}

Status FaultFile::Lock(qcow2dedup::LockMode mode) {
  std::lock_guard lock(s_->mu);
  if (!s_->powered) return PowerOff();
  return s_->base->Lock(mode);
}

Result<uint64_t> FaultFile::NextData(uint64_t offset) {
  std::lock_guard lock(s_->mu);
  if (!s_->powered) return PowerOff();
  return s_->base->NextData(offset);
}

const std::string& FaultFile::name() const { return s_->name; }

void FaultFile::FailWrite(uint64_t n, FaultKind kind, bool sticky, uint64_t partial_bytes) {
  std::lock_guard lock(s_->mu);
  s_->write_fault = {n, kind, sticky, partial_bytes};
}

void FaultFile::FailSync(uint64_t n, FaultKind kind, bool sticky) {
  std::lock_guard lock(s_->mu);
  s_->sync_fault = {n, kind, sticky, 0};
}

void FaultFile::FailTruncate(uint64_t n, FaultKind kind, bool sticky) {
  std::lock_guard lock(s_->mu);
  s_->truncate_fault = {n, kind, sticky, 0};
}

void FaultFile::FailReads(bool on) {
  std::lock_guard lock(s_->mu);
  s_->fail_reads = on;
}

void FaultFile::ClearFaults() {
  std::lock_guard lock(s_->mu);
  s_->write_fault = s_->sync_fault = s_->truncate_fault = {};
  s_->fail_reads = false;
}

uint64_t FaultFile::reads() const {
  std::lock_guard lock(s_->mu);
  return s_->reads;
}
uint64_t FaultFile::writes() const {
  std::lock_guard lock(s_->mu);
  return s_->writes;
}
uint64_t FaultFile::syncs() const {
  std::lock_guard lock(s_->mu);
  return s_->syncs;
}
uint64_t FaultFile::truncates() const {
  std::lock_guard lock(s_->mu);
  return s_->truncates;
}
uint64_t FaultFile::failed_writes() const {
  std::lock_guard lock(s_->mu);
  return s_->failed_writes;
}
uint64_t FaultFile::failed_syncs() const {
  std::lock_guard lock(s_->mu);
  return s_->failed_syncs;
}
uint64_t FaultFile::bytes_written() const {
  std::lock_guard lock(s_->mu);
  return s_->bytes_written;
}
size_t FaultFile::unsynced_ops() const {
  std::lock_guard lock(s_->mu);
  return s_->log.size();
}
std::vector<UnsyncedOp> FaultFile::UnsyncedLog() const {
  std::lock_guard lock(s_->mu);
  return s_->log;
}
uint64_t FaultFile::synced_size() const {
  std::lock_guard lock(s_->mu);
  return s_->synced_size;
}
bool FaultFile::powered() const {
  std::lock_guard lock(s_->mu);
  return s_->powered;
}

Result<std::vector<uint8_t>> FaultFile::CrashImage(const KeepFn& keep) const {
  std::lock_guard lock(s_->mu);
  QD_ASSIGN_OR_RETURN(uint64_t size, s_->base->Size());
  std::vector<uint8_t> bytes(size);
  QD_RETURN_IF_ERROR(s_->base->ReadAt(0, bytes));
  MemorySink sink(bytes);
  QD_RETURN_IF_ERROR(ApplyCrash(sink, s_->log, s_->synced_size, keep));
  return bytes;
}

Status FaultFile::SaveCrashImage(const std::string& path, const KeepFn& keep) const {
  QD_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, CrashImage(keep));
  QD_ASSIGN_OR_RETURN(auto out, qcow2dedup::OpenPosixFile(path, qcow2dedup::OpenMode::kCreateOrOpen));
  QD_RETURN_IF_ERROR(out->Truncate(0));
  if (!bytes.empty()) QD_RETURN_IF_ERROR(out->WriteAt(0, bytes));
  return out->Sync();
}

Status FaultFile::PowerCut(const KeepFn& keep) {
  std::lock_guard lock(s_->mu);
  if (!s_->powered) return PowerOff();
  s_->powered = false;
  FileSink sink(*s_->base);
  QD_RETURN_IF_ERROR(ApplyCrash(sink, s_->log, s_->synced_size, keep));
  s_->log.clear();
  QD_RETURN_IF_ERROR(s_->base->Sync());
  QD_ASSIGN_OR_RETURN(uint64_t size, s_->base->Size());
  s_->synced_size = size;
  if (s_->reopen) {
    s_->base.reset();  // closing drops the locks
    QD_ASSIGN_OR_RETURN(s_->base, s_->reopen());
  }
  return Status::Ok();
}

void FaultFile::PowerOn() {
  std::lock_guard lock(s_->mu);
  s_->powered = true;
  s_->log.clear();
}

}  // namespace testing
