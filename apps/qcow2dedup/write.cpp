// write: bytes from a file, standard input or a pattern into an image at
// an offset, through the dedup write path.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>

#include "commands.h"
#include "progress.h"

namespace qcow2dedup::cli {
namespace {

constexpr size_t kChunk = 4u << 20;

struct {
  std::string image;
  uint64_t offset = 0;
  std::string input;
  int pattern = -1;
  uint64_t length = 0;
  bool verify = false, quiet = false, progress = false;
  CacheMode cache = CacheMode::kWriteback;
} opts;

std::string Errno(std::string_view what) { return fmt::format("{}: {}", what, std::strerror(errno)); }

// The bytes to write, with their length known before anything is written:
// a pipe is first spooled to a temporary file, so that a write that would
// not fit is refused whole.
class Input {
 public:
  ~Input() {
    if (spool_) std::fclose(spool_);
    if (fd_ > STDIN_FILENO) ::close(fd_);
  }
  Status Open(const std::string& path) {
    if (path == "-") {
      fd_ = STDIN_FILENO;
    } else if ((fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC)) < 0) {
      return Status::IOError(Errno("cannot open"));
    }
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Status::IOError(Errno("stat failed"));
    if (S_ISREG(st.st_mode)) {
      const off_t pos = ::lseek(fd_, 0, SEEK_CUR);  // standard input may be read partly already
      if (pos >= 0 && pos <= st.st_size) {
        length_ = uint64_t(st.st_size - pos);
        return Status::Ok();
      }
    }
    if (S_ISDIR(st.st_mode)) return Status::InvalidArgument("is a directory");
    return Spool();
  }
  uint64_t length() const { return length_; }
  Status Read(std::span<uint8_t> buf) {
    size_t got = 0;
    while (got < buf.size()) {
      ssize_t n = ::read(fd_, buf.data() + got, buf.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::IOError(Errno("read failed"));
      if (n == 0) return Status::IOError("the input ended early (did it shrink while we read it?)");
      got += size_t(n);
    }
    return Status::Ok();
  }

 private:
  Status Spool() {
    spool_ = std::tmpfile();
    if (!spool_) return Status::IOError(Errno("cannot create a temporary file for the input"));
    std::vector<uint8_t> buf(kChunk);
    for (;;) {
      ssize_t n = ::read(fd_, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::IOError(Errno("read failed"));
      if (n == 0) break;
      if (std::fwrite(buf.data(), 1, size_t(n), spool_) != size_t(n))
        return Status::IOError(Errno("cannot spool the input to a temporary file"));
      length_ += uint64_t(n);
    }
    if (std::fflush(spool_) != 0) return Status::IOError(Errno("cannot spool the input to a temporary file"));
    if (fd_ > STDIN_FILENO) ::close(fd_);
    fd_ = fileno(spool_);
    if (::lseek(fd_, 0, SEEK_SET) != 0) return Status::IOError(Errno("seek failed"));
    return Status::Ok();
  }

  int fd_ = -1;
  std::FILE* spool_ = nullptr;
  uint64_t length_ = 0;
};

int ParsePattern(const std::string& text) {
  const bool hex = text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X');
  unsigned value = 0;
  const char* begin = text.data() + (hex ? 2 : 0);
  const char* end = text.data() + text.size();
  auto [p, ec] = std::from_chars(begin, end, value, hex ? 16 : 10);
  if (begin == end || ec != std::errc() || p != end || value > 255)
    throw CLI::ValidationError("--pattern", fmt::format("'{}' is not a byte (0..255 or 0x00..0xff)", text));
  return int(value);
}

}  // namespace

void SetupWrite(CLI::App& app) {
  auto* input = app.add_option("--input", opts.input, "Write this file's bytes (- for standard input)")
                    ->option_text("FILE|-");
  auto* pattern = app.add_option_function<std::string>(
                         "--pattern", [](const std::string& t) { opts.pattern = ParsePattern(t); },
                         "Write this byte (0..255 or 0x00..0xff), --length times")
                      ->option_text("BYTE");
  auto* length = AddSizeOption(app, "--length", opts.length, "How many pattern bytes; suffixes K M G T P E");
  pattern->needs(length);
  length->needs(pattern);
  input->excludes(pattern);
  app.add_flag("--verify", opts.verify, "Compare bytes before sharing a cluster (not only hashes)");
  AddCacheOption(app, opts.cache);
  app.add_flag("-p,--progress", opts.progress, "Show progress on stderr");
  app.add_flag("-q,--quiet", opts.quiet, "Print nothing (overrides -p)");
  app.add_option("IMAGE", opts.image, "The image to write into")->required();
  AddSizeOption(app, "OFFSET", opts.offset, "Guest offset to write at; suffixes K M G T P E")->required();
}

int RunWrite() {
  if (opts.input.empty() && opts.pattern < 0) throw CLI::RequiredError("--input or --pattern");
  if (opts.quiet) opts.progress = false;
  Input input;
  uint64_t length = opts.length;
  if (!opts.input.empty()) {
    if (Status s = input.Open(opts.input); !s.ok()) return Fail(DisplayName(opts.input), s);
    length = input.length();
  }

  std::unique_ptr<Image> img;
  Progress progress(opts.progress, Progress::Unit::kClusters, DedupSoFar(img));
  OpenOptions open;
  open.writable = true;
  open.verify = opts.verify;
  open.cache = opts.cache;
  open.progress = progress.fn();  // an index rebuild can take a while
  auto opened = Image::Open(opts.image, std::move(open));
  if (!opened.ok()) return Fail(opts.image, opened.status());
  progress.Restart(Progress::Unit::kBytes);  // before img is set: the rebuild line shows no dedup ratio
  img = std::move(opened).value();

  // The image itself is sound in these failures: close it clean.
  auto close_and_fail = [&img](const std::string& what, std::string message) {
    if (Status closed = img->Close(); !closed.ok()) message += "; closing the image failed too: " + closed.message();
    return Fail(what, message);
  };
  const uint64_t size = img->virtual_size();
  if (opts.offset > size || length > size - opts.offset)
    // Nothing written yet: leave the file exactly as it was (no Close).
    return Fail(opts.image, fmt::format("cannot write {} bytes at offset {}: the virtual size is {}", length,
                                        opts.offset, size));
  std::vector<uint8_t> buf(std::min<uint64_t>(kChunk, length), uint8_t(opts.pattern));
  for (uint64_t done = 0; done < length;) {
    std::span<uint8_t> chunk(buf.data(), std::min<uint64_t>(buf.size(), length - done));
    if (!opts.input.empty()) {
      if (Status s = input.Read(chunk); !s.ok()) return close_and_fail(DisplayName(opts.input), s.message());
    }
    if (Status s = img->Write(opts.offset + done, chunk); !s.ok()) return Fail(opts.image, s);
    done += chunk.size();
    progress.Update(done, length);
  }
  if (Status s = img->Close(); !s.ok()) return Fail(opts.image, s);
  progress.Finish();
  if (opts.progress) PrintWriteSummary(img->write_stats());
  return 0;
}

}  // namespace qcow2dedup::cli
