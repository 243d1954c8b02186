// FaultFile: a File over any other File that fails chosen writes and syncs,
// counts what goes through it, and cuts the power.
//
// Faults: the n-th WriteAt, Sync or Truncate (counted from 1 over the life of
// the file, failed calls included) can fail with EIO (Status::IOError) or
// ENOSPC (Status::NoSpace), optionally after writing part of the data (a
// torn write), and optionally every later call of that kind too (a disk
// that stays broken).
//
// Power cuts: every WriteAt and Truncate since the last successful Sync is
// logged with the bytes it replaced. CrashImage() gives the file as it would
// be after a power cut in which those unsynced operations were lost (all of
// them, or all but those a predicate keeps, to model a disk that persists
// some unsynced writes and not others); PowerCut() does the same to the file
// itself and turns the power off: until PowerOn(), every call fails.
//
// Handles: Share() gives another handle on the same file and state, so a
// test can hand one to an Image (which owns and destroys it) and keep the
// other to arm faults, read counters and cut the power.
//
// Every call takes one mutex: the library reads from several threads.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qcow2dedup/file.h"

namespace testing {

enum class FaultKind { kEIO, kENOSPC };

// One operation that was not yet synced.
struct UnsyncedOp {
  enum Kind { kWrite, kTruncate } kind;
  uint64_t offset;            // kWrite: where; kTruncate: the new size
  std::vector<uint8_t> data;  // kWrite: the bytes written
  uint64_t old_size;          // file size before the operation
  // What the operation replaced inside the old size: for kWrite the old bytes
  // of [offset, min(offset + data.size(), old_size)); for a shrinking
  // kTruncate the bytes of [offset, old_size).
  std::vector<uint8_t> old;
};

// Which unsynced operations (index in order, the operation) reach the disk.
using KeepFn = std::function<bool(size_t index, const UnsyncedOp& op)>;

// Opens the base file anew (see PowerCut).
using ReopenFn = std::function<qcow2dedup::Result<std::unique_ptr<qcow2dedup::File>>()>;

class FaultFile final : public qcow2dedup::File {
 public:
  explicit FaultFile(std::unique_ptr<qcow2dedup::File> base, ReopenFn reopen = {});
  ~FaultFile() override;
  FaultFile(const FaultFile&) = delete;
  FaultFile& operator=(const FaultFile&) = delete;

  // Opens path (read-write) and wraps it, with a ReopenFn that opens it again.
  static qcow2dedup::Result<std::unique_ptr<FaultFile>> Open(const std::string& path);

  // Another handle on the same base file, faults, counters and log.
  std::unique_ptr<FaultFile> Share() const;

  // File.
  qcow2dedup::Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override;
  qcow2dedup::Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override;
  qcow2dedup::Status Sync() override;
  qcow2dedup::Result<uint64_t> Size() override;
  qcow2dedup::Status Truncate(uint64_t size) override;
  // Modelled as a write of zeros: faults and power cuts treat it alike.
  qcow2dedup::Status PunchHole(uint64_t offset, uint64_t len) override;
  qcow2dedup::Status Lock(qcow2dedup::LockMode mode) override;
  qcow2dedup::Result<uint64_t> NextData(uint64_t offset) override;
  const std::string& name() const override;

  // Faults. n counts calls of that kind from 1 over the file's life (see
  // writes(), syncs(), truncates()); n <= the count so far never fires.
  // A torn write stores its first partial_bytes before failing.
  // With sticky, call n and every later call of that kind fail.
  void FailWrite(uint64_t n, FaultKind kind = FaultKind::kEIO, bool sticky = false, uint64_t partial_bytes = 0);
  void FailSync(uint64_t n, FaultKind kind = FaultKind::kEIO, bool sticky = false);
  void FailTruncate(uint64_t n, FaultKind kind = FaultKind::kEIO, bool sticky = false);
  // Fails every read from now on with EIO (or stops doing so).
  void FailReads(bool on);
  // Disarms every fault (not the power: see PowerOn).
  void ClearFaults();

  // Counters: calls made (failed ones included) and how many of them failed.
  uint64_t reads() const;
  uint64_t writes() const;
  uint64_t syncs() const;
  uint64_t truncates() const;
  uint64_t failed_writes() const;
  uint64_t failed_syncs() const;
  uint64_t bytes_written() const;  // by successful (or torn) writes

  // Power.
  size_t unsynced_ops() const;
  std::vector<UnsyncedOp> UnsyncedLog() const;
  uint64_t synced_size() const;
  // The bytes of the file after a power cut now; keep chooses unsynced
  // operations that still reach the disk (none if empty). The file itself
  // is not touched.
  qcow2dedup::Result<std::vector<uint8_t>> CrashImage(const KeepFn& keep = {}) const;
  // Writes CrashImage(keep) to a new file at path (replacing it).
  qcow2dedup::Status SaveCrashImage(const std::string& path, const KeepFn& keep = {}) const;
  // Puts the base file in its crash state (as CrashImage) and turns the power
  // off: every later call through any handle fails with IOError. With a
  // ReopenFn the base file is then closed and opened anew, which drops the
  // locks it held, as the death of the process would.
  qcow2dedup::Status PowerCut(const KeepFn& keep = {});
  // Turns the power back on; the log starts empty (the file is as synced).
  void PowerOn();
  bool powered() const;

  struct State;

 private:
  explicit FaultFile(std::shared_ptr<State> s);
  std::shared_ptr<State> s_;
};

}  // namespace testing
