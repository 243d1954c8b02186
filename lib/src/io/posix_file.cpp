#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "io/lock_holders.h"
#include "qcow2dedup/file.h"

namespace qcow2dedup {
namespace {

Status ErrnoStatus(const std::string& what, int err) {
  std::string msg = what + ": " + std::strerror(err);
  if (err == ENOSPC || err == EDQUOT) return Status::NoSpace(msg);
  if (err == ENOENT) return Status::NotFound(msg);
  if (err == EEXIST) return Status::Exists(msg);
  return Status::IOError(msg);
}

// QEMU's permission bits and the byte offsets where it locks them.
constexpr int kPermConsistentRead = 0, kPermWrite = 1, kPermResize = 3;
constexpr off_t kPermBase = 100, kSharedBase = 200;

class PosixFile final : public File {
 public:
  PosixFile(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}
  ~PosixFile() override {
    if (direct_fd_ >= 0) ::close(direct_fd_);
    ::close(fd_);
  }

  Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pread(fd_, buf.data() + done, buf.size() - done, off_t(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoStatus("read failed", errno);
      }
      if (n == 0) {  // end of file: the rest reads as zero
        std::memset(buf.data() + done, 0, buf.size() - done);
        break;
      }
      done += size_t(n);
    }
    return Status::Ok();
  }

  // O_DIRECT on a second descriptor of the same file (it takes no locks, so
  // closing it drops none). The kernel writes back our own cached writes to
  // a range before reading it direct. Anything unaligned, a file system
  // without direct I/O, or a short read at the end reads through the cache.
  Status ReadUncached(uint64_t offset, std::span<uint8_t> buf) override {
    constexpr uint64_t kAlign = 4096;
    std::call_once(direct_opened_, [this] {
      direct_fd_ = ::open(("/proc/self/fd/" + std::to_string(fd_)).c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
      direct_ok_ = direct_fd_ >= 0;
    });
    if (!direct_ok_ || offset % kAlign || buf.size() % kAlign || reinterpret_cast<uintptr_t>(buf.data()) % kAlign)
      return ReadAt(offset, buf);
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pread(direct_fd_, buf.data() + done, buf.size() - done, off_t(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EINVAL) direct_ok_ = false;
      if (n <= 0 || n % kAlign) break;  // the cached read below reports errors and the end
      done += size_t(n);
    }
    return done == buf.size() ? Status::Ok() : ReadAt(offset + done, buf.subspan(done));
  }

  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done, off_t(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoStatus("write failed", errno);
      }
      done += size_t(n);
    }
    return Status::Ok();
  }

  Status Sync() override {
    if (::fdatasync(fd_) != 0) return ErrnoStatus("sync failed", errno);
    return Status::Ok();
  }

  Result<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return ErrnoStatus("stat failed", errno);
    if (S_ISBLK(st.st_mode)) {
      off_t end = ::lseek(fd_, 0, SEEK_END);
      if (end < 0) return ErrnoStatus("seek failed", errno);
      return uint64_t(end);
    }
    return uint64_t(st.st_size);
  }

  std::optional<FileStamp> Stamp() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;
    return FileStamp{uint64_t(st.st_dev), uint64_t(st.st_ino), uint64_t(st.st_size), int64_t(st.st_ctim.tv_sec),
                     int64_t(st.st_ctim.tv_nsec)};
  }

  Status Truncate(uint64_t size) override {
    if (::ftruncate(fd_, off_t(size)) != 0) return ErrnoStatus("truncate failed", errno);
    return Status::Ok();
  }

  Status PunchHole(uint64_t offset, uint64_t len) override {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(offset), off_t(len)) == 0)
      return Status::Ok();
    // A file system without holes keeps the bytes: nothing is lost but space.
    if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) return Status::Ok();
    return ErrnoStatus("punching a hole failed", errno);
  }

  Result<uint64_t> NextData(uint64_t offset) override {
    off_t r = ::lseek(fd_, off_t(offset), SEEK_DATA);
    if (r >= 0) return uint64_t(r);
    if (errno == ENXIO) return Size();
    return offset;  // no hole support: everything is data
  }

  void Prefetch(uint64_t offset, uint64_t len) override {
    ::posix_fadvise(fd_, off_t(offset), off_t(len), POSIX_FADV_WILLNEED);
  }

  Status Lock(LockMode mode) override {
    if (mode == LockMode::kNone) return Status::Ok();
    // What we take and what we refuse to share, exactly as qemu-io does.
    bool write = mode == LockMode::kExclusive;
    int take[] = {kPermConsistentRead, kPermWrite, kPermResize};
    int ntake = write ? 3 : 1;
    int deny[] = {kPermWrite, kPermResize};
    for (int i = 0; i < ntake; ++i) {
      QD_RETURN_IF_ERROR(Probe(kSharedBase + take[i]));
    }
    for (int p : deny) QD_RETURN_IF_ERROR(Probe(kPermBase + p));
    for (int i = 0; i < ntake; ++i) QD_RETURN_IF_ERROR(Take(kPermBase + take[i]));
    for (int p : deny) QD_RETURN_IF_ERROR(Take(kSharedBase + p));
    return Status::Ok();
  }

  const std::string& name() const override { return name_; }

 private:
  static struct flock Byte(off_t at, short type) {
    struct flock fl = {};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = at;
    fl.l_len = 1;
    return fl;
  }
  Status Probe(off_t at) {
    struct flock fl = Byte(at, F_WRLCK);
    if (::fcntl(fd_, F_OFD_GETLK, &fl) != 0) return ErrnoStatus("lock query failed", errno);
    if (fl.l_type != F_UNLCK) return InUse();
    return Status::Ok();
  }
  // Names the holder where Linux tells (QEMU, another qcow2dedup, ...).
  Status InUse() const {
    const std::string holders = LockHolders(fd_);
    if (holders.empty()) return Status::Busy("the image is in use by another program, which holds its lock");
    const bool one = holders.find(", ") == std::string::npos;
    return Status::Busy("the image is in use: " + holders + (one ? " holds" : " hold") + " its lock");
  }
  Status Take(off_t at) {
    struct flock fl = Byte(at, F_RDLCK);
    if (::fcntl(fd_, F_OFD_SETLK, &fl) != 0) {
      if (errno == EAGAIN || errno == EACCES) return InUse();
      return ErrnoStatus("lock failed", errno);
    }
    return Status::Ok();
  }

  int fd_;
  std::string name_;
  std::once_flag direct_opened_;
  int direct_fd_ = -1;
  std::atomic<bool> direct_ok_{false};
};

}  // namespace

Result<std::unique_ptr<File>> OpenPosixFile(const std::string& path, OpenMode mode) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case OpenMode::kReadOnly: flags |= O_RDONLY; break;
    case OpenMode::kReadWrite: flags |= O_RDWR; break;
    case OpenMode::kCreate: flags |= O_RDWR | O_CREAT | O_EXCL; break;
    case OpenMode::kCreateOrOpen: flags |= O_RDWR | O_CREAT; break;
  }
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) return ErrnoStatus("cannot open", errno);
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument("is a directory");
  }
  return std::unique_ptr<File>(new PosixFile(fd, path));
}

Result<std::unique_ptr<File>> OpenScratchFile(const std::string& dir) {
  // Unnamed where the kernel allows it, so that no exit leaves it behind.
  int fd = ::open(dir.c_str(), O_RDWR | O_TMPFILE | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::string name = dir + "/.qcow2dedup-scratch-XXXXXX";
    fd = ::mkostemp(name.data(), O_CLOEXEC);
    if (fd < 0) return ErrnoStatus("cannot make a scratch file in " + dir, errno);
    ::unlink(name.c_str());
  }
  return std::unique_ptr<File>(new PosixFile(fd, dir + "/(scratch)"));
}

}  // namespace qcow2dedup
