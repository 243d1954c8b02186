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
#include "image_options.h"
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
  uint64_t flush_interval = 0;
  CacheMode cache = CacheMode::kWriteback;
  std::vector<std::string> options;  // -o
} opts;

std::string Errno(std::string_view what) { return fmt::format("{}: {}", what, std::strerror(errno)); }

// The bytes to write, with their length known before anything is written:
// a stream (standard input, a FIFO, a character device) is first staged in
// a temporary file, but never more of it than the write can use, so that a
// write that would not fit is refused whole and at once.
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
    stream_ = true;
    return Status::Ok();
  }
  // A stream: stages at most `limit` bytes. False, at once, if there are more.
  Result<bool> Stage(uint64_t limit) {
    if (!stream_) return true;
    spool_ = std::tmpfile();
    if (!spool_) return Status::IOError(Errno("cannot create a temporary file for the input"));
    std::vector<uint8_t> buf(std::min<uint64_t>(kChunk, limit + 1));
    for (;;) {
      // One byte past the limit tells a stream that fits from one that does not.
      const size_t want = size_t(std::min<uint64_t>(buf.size(), limit + 1 - length_));
      ssize_t n = ::read(fd_, buf.data(), want);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::IOError(Errno("read failed"));
      if (n == 0) break;
      if (length_ + uint64_t(n) > limit) return false;
      if (std::fwrite(buf.data(), 1, size_t(n), spool_) != size_t(n))
        return Status::IOError(Errno("cannot stage the input in a temporary file"));
      length_ += uint64_t(n);
    }
    if (std::fflush(spool_) != 0) return Status::IOError(Errno("cannot stage the input in a temporary file"));
    if (fd_ > STDIN_FILENO) ::close(fd_);
    fd_ = fileno(spool_);
    if (::lseek(fd_, 0, SEEK_SET) != 0) return Status::IOError(Errno("seek failed"));
    return true;
  }
  bool stream() const { return stream_; }
  uint64_t length() const { return length_; }
  // Fills buf; read_ counts the bytes read so far, for the error message.
  Status Read(std::span<uint8_t> buf) {
    size_t got = 0;
    while (got < buf.size()) {
      ssize_t n = ::read(fd_, buf.data() + got, buf.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::IOError(Errno("read failed"));
      if (n == 0)
        return Status::IOError(fmt::format("the input ended after {} of its {} bytes (did it shrink while it was read?)",
                                           read_ + got, length_));
      got += size_t(n);
    }
    read_ += got;
    return Status::Ok();
  }

 private:
  int fd_ = -1;
  bool stream_ = false;
  std::FILE* spool_ = nullptr;
  uint64_t length_ = 0, read_ = 0;
};

// A failure of the image part way through: some clusters may hold the new
// data, every one its old or its new (the man page, "write").
std::string PartWay(const Status& s) {
  return s.message() + "; the write stopped part way: after a repair (check -r all, or the next write) each "
                       "cluster of the range holds its old or its new data";
}

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
  AddFlushIntervalOption(app, opts.flush_interval);
  AddSessionOptions(app, opts.options);
  app.add_flag("-p,--progress", opts.progress, "Show progress on stderr");
  app.add_flag("-q,--quiet", opts.quiet, "Print nothing (overrides -p)");
  app.add_option("IMAGE", opts.image, "The image to write into")->required();
  AddSizeOption(app, "OFFSET", opts.offset, "Guest offset to write at; suffixes K M G T P E")->required();
}

int RunWrite() {
  if (opts.input.empty() && opts.pattern < 0) throw CLI::RequiredError("--input or --pattern");
  if (opts.quiet) opts.progress = false;
  uint64_t index_memory = 0;
  if (Status s = ParseSessionOptions(opts.options, index_memory); !s.ok()) return Fail(opts.image, s);
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
  open.index_memory = index_memory;
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
  // Nothing written yet in these refusals: leave the file exactly as it was (no Close).
  if (input.stream()) {
    if (opts.offset > size)
      return Fail(opts.image, fmt::format("cannot write at offset {}: the virtual size is {}", opts.offset, size));
    const uint64_t room = size - opts.offset;
    auto fits = input.Stage(room);
    if (!fits.ok()) return Fail(DisplayName(opts.input), fits.status());
    if (!*fits)
      return Fail(opts.image, fmt::format("cannot write the input at offset {}: it is longer than the {} bytes "
                                          "left before the virtual size {} (nothing was written)",
                                          opts.offset, room, size));
    length = input.length();
  }
  if (opts.offset > size || length > size - opts.offset)
    return Fail(opts.image, fmt::format("cannot write {} bytes at offset {}: the virtual size is {}", length,
                                        opts.offset, size));
  std::vector<uint8_t> buf(std::min<uint64_t>(kChunk, length), uint8_t(opts.pattern));
  uint64_t flushed = 0;
  const uint64_t cs = img->cluster_size();
  for (uint64_t done = 0; done < length;) {
    // Chunks end on cluster boundaries (but the last): a cluster split over
    // two Write calls, with a flush between them (--flush-interval, or a
    // full table cache), would after a crash hold neither its old nor its
    // new data, but half of each.
    uint64_t n = std::min<uint64_t>(buf.size(), length - done);
    if (done + n < length) n -= (opts.offset + done + n) % cs;
    std::span<uint8_t> chunk(buf.data(), n);
    if (!opts.input.empty()) {
      if (Status s = input.Read(chunk); !s.ok())
        // What was written stays: say exactly which bytes.
        return close_and_fail(DisplayName(opts.input),
                              fmt::format("{}; the first {} bytes (offset {} to {}) were written, the rest of the "
                                          "range is unchanged",
                                          s.message(), done, opts.offset, opts.offset + done));
    }
    if (Status s = img->Write(opts.offset + done, chunk); !s.ok()) return Fail(opts.image, PartWay(s));
    done += chunk.size();
    if (opts.flush_interval && done - flushed >= opts.flush_interval) {
      if (Status s = img->Flush(); !s.ok()) return Fail(opts.image, PartWay(s));
      flushed = done;
    }
    progress.Update(done, length);
  }
  if (Status s = img->Close(); !s.ok()) return Fail(opts.image, PartWay(s));
  progress.Finish();
  if (opts.progress) PrintWriteSummary(img->write_stats());
  return 0;
}

}  // namespace qcow2dedup::cli
