// File: the one seam between the library and the operating system.
// Everything the library reads or writes goes through it, so tests can swap
// in a file that fails the n-th write or loses what was never synced.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "qcow2dedup/status.h"

#pragma GCC visibility push(default)  // the public API: exported from the shared library

namespace qcow2dedup {

enum class OpenMode { kReadOnly, kReadWrite, kCreate /* fails if it exists */, kCreateOrOpen /* never truncates: lock first */ };

// Which of QEMU's image permissions we take (see qcow2-facts.md, locking).
enum class LockMode { kNone, kShared /* read, forbid writers */, kExclusive /* write */ };

// Which file this is, and its size and change time (fstat): any write to
// the file, by anyone, changes the change time.
struct FileStamp {
  uint64_t device = 0, inode = 0, size = 0;
  int64_t ctime_sec = 0, ctime_nsec = 0;
  friend bool operator==(const FileStamp&, const FileStamp&) = default;
};

class File {
 public:
  virtual ~File() = default;
  // Reads buf.size() bytes at offset; bytes past the end of file read as zero.
  virtual Status ReadAt(uint64_t offset, std::span<uint8_t> buf) = 0;
  virtual Status WriteAt(uint64_t offset, std::span<const uint8_t> data) = 0;
  // Makes everything written so far durable (fdatasync).
  virtual Status Sync() = 0;
  virtual Result<uint64_t> Size() = 0;
  virtual Status Truncate(uint64_t size) = 0;
  // Gives [offset, offset + len) back to the file system; it reads as zero
  // afterwards where holes are supported, and may keep its bytes elsewhere.
  virtual Status PunchHole(uint64_t offset, uint64_t len) { (void)offset, (void)len; return Status::Ok(); }
  // Takes QEMU's OFD byte locks so that neither side writes under the other.
  virtual Status Lock(LockMode mode) = 0;
  // Where the next data at or after offset starts (SEEK_DATA); Size() if none.
  virtual Result<uint64_t> NextData(uint64_t offset) { return offset; }
  // A hint that [offset, offset + len) will be read soon (readahead).
  virtual void Prefetch(uint64_t offset, uint64_t len) { (void)offset, (void)len; }
  // ReadAt for data read once in a pass over the whole file (dedup's
  // hashing): past the page cache where the system allows, so that the pass
  // neither pays for filling the cache nor evicts what others use. Callers
  // align buf, offset and size to 4 KiB to make that possible.
  virtual Status ReadUncached(uint64_t offset, std::span<uint8_t> buf) { return ReadAt(offset, buf); }
  // None where the file is not one of the operating system's (a test's).
  virtual std::optional<FileStamp> Stamp() { return std::nullopt; }
  virtual const std::string& name() const = 0;
};

// Opens a file of the operating system. "-" is not special here.
Result<std::unique_ptr<File>> OpenPosixFile(const std::string& path, OpenMode mode);
// An empty file in dir that no name reaches: it is gone when closed.
Result<std::unique_ptr<File>> OpenScratchFile(const std::string& dir);

}  // namespace qcow2dedup

#pragma GCC visibility pop
