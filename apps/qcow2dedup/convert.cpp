// convert: any readable image (or standard input) into a dedup image, or
// any readable image out to a sparse raw file.
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "backing.h"
#include "commands.h"
#include "image_options.h"
#include "progress.h"
#include "size.h"
#include "qcow2dedup/convert.h"

namespace qcow2dedup::cli {
namespace {

struct {
  std::string src, dst;
  ImageFormat src_format = ImageFormat::kAuto;
  std::string out_format = "qcow2";
  std::vector<std::string> options;
  bool progress = false, quiet = false, force = false, verify = false, force_share = false;
  bool compress = false;  // -c
  uint64_t flush_interval = 0;
  bool no_create = false, target_is_zero = false;  // -n, --target-is-zero
  bool bitmaps = false;                             // --bitmaps
  std::string snapshot;                             // -l
  std::string sparse = "4k";                        // -S
  uint64_t sparse_size = 4096;
  CacheMode cache = CacheMode::kWriteback;
  BackingArgs backing;                              // -B, -F
} opts;

// Forwards to the source and remembers whether it failed: the library's
// messages do not say which side of a copy went wrong, this does.
class BlamedSource final : public BlockDevice {
 public:
  explicit BlamedSource(BlockDevice& inner) : inner_(inner) {}
  uint64_t virtual_size() const override { return inner_.virtual_size(); }
  std::string format() const override { return inner_.format(); }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override { return Note(inner_.Read(offset, buf)); }
  void Prefetch(uint64_t offset, uint64_t len) override { inner_.Prefetch(offset, len); }
  Result<uint64_t> ZeroRun(uint64_t offset) override {
    auto r = inner_.ZeroRun(offset);
    if (!r.ok()) failed = true;
    return r;
  }
  bool failed = false;

 private:
  Status Note(Status s) {
    if (!s.ok()) failed = true;
    return s;
  }
  BlockDevice& inner_;
};

bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa, sb;
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

// Removes a half-written destination, but only one this run created or,
// with --force, replaced: a file we never touched is not ours to delete.
class Destination {
 public:
  explicit Destination(std::string path) : path_(std::move(path)), existed_(Exists(path_)) {}
  // The destination now holds our (unfinished) output.
  void Claim() { owned_ = !existed_ || IsRegularFile(path_); }
  // Reports the failure; removes the destination if it is ours.
  int Fail(std::string_view what, const Status& s) {
    const int rc = cli::Fail(what, s);
    const bool ours = owned_ || (!existed_ && s.kind() != ErrorKind::kExists);
    if (ours && Exists(path_)) ::unlink(path_.c_str());
    return rc;
  }
  bool existed() const { return existed_; }

 private:
  std::string path_;
  bool existed_;
  bool owned_ = false;
};

Result<size_t> ReadStdin(std::span<uint8_t> buf) {
  for (;;) {
    ssize_t n = ::read(STDIN_FILENO, buf.data(), buf.size());
    if (n >= 0) return size_t(n);
    if (errno != EINTR) return Status::IOError(fmt::format("read failed: {}", std::strerror(errno)));
  }
}

// -l: qemu-img's "snapshot.id=ID,snapshot.name=NAME" (either or both), or
// one word that is tried as an id first and then as a name.
Status SelectSnapshot(Image& image, const std::string& arg) {
  if (arg.rfind("snapshot.", 0) != 0) {
    Status s = image.SelectSnapshot(arg, std::nullopt);
    if (s.kind() == ErrorKind::kNotFound) s = image.SelectSnapshot(std::nullopt, arg);
    return s;
  }
  std::optional<std::string> id, name;
  size_t pos = 0;
  while (pos <= arg.size()) {
    const size_t comma = std::min(arg.find(',', pos), arg.size());
    const std::string item = arg.substr(pos, comma - pos);
    pos = comma + 1;
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
    if (key == "snapshot.id") id = value;
    else if (key == "snapshot.name") name = value;
    else
      return Status::InvalidArgument(
          fmt::format("Invalid parameter '{}' Failed in parsing snapshot param '{}'", key, arg));
  }
  return image.SelectSnapshot(id, name);
}

// Set when -l failed: qemu-img reports that without a file name, as we then do.
bool snapshot_failed = false;

// What an error opening the source is about: the file, or (-l) the snapshot.
std::string SourceWhat() { return snapshot_failed ? "" : opts.src; }

// The source device; with -l, the snapshot's view of it.
Result<std::unique_ptr<BlockDevice>> OpenSource() {
  QD_ASSIGN_OR_RETURN(auto dev, OpenBlockDevice(opts.src, opts.src_format, opts.force_share));
  if (opts.snapshot.empty()) return dev;
  auto* image = dynamic_cast<Image*>(dev.get());
  snapshot_failed = true;
  if (!image) return Status::InvalidArgument("Failed to load snapshot: a raw image has no snapshots");
  if (Status s = SelectSnapshot(*image, opts.snapshot); !s.ok()) {
    if (s.kind() == ErrorKind::kNotFound) return Status::NotFound("Failed to load snapshot: " + s.message());
    return s;
  }
  snapshot_failed = false;
  return dev;
}

int ToQcow2(const ImageOptions& o) {
  const bool from_stdin = opts.src == "-";
  std::unique_ptr<BlockDevice> src;
  if (!from_stdin) {
    auto dev = OpenSource();
    if (!dev.ok()) return Fail(SourceWhat(), dev.status());
    src = std::move(dev).value();
  }
  // --bitmaps: read before anything is created, so a bad one stops it all.
  std::vector<PersistentBitmap> bitmaps;
  if (opts.bitmaps) {
    auto* image = dynamic_cast<Image*>(src.get());
    if (!image) return Fail("", "Source lacks bitmap support");
    auto read = image->ReadBitmaps();
    if (!read.ok()) return Fail(SourceWhat(), read.status());
    bitmaps = std::move(read).value();
  }
  // -B: the base, opened here apart from the one dst opens, for the workers
  // to compare with; checked before anything is created.
  std::unique_ptr<BlockDevice> base;
  if (opts.backing.given() && !(base = OpenBase(opts.dst, opts.backing))) return 1;
  CreateOptions create = o.create;
  create.virtual_size = src ? (src->virtual_size() + 511) / 512 * 512 : 0;
  create.backing_file = opts.backing.name;
  create.backing_format = opts.backing.format;
  create.force = opts.force;
  OpenOptions open;
  open.verify = opts.verify || o.verify;
  open.cache = opts.cache;
  open.index_memory = o.index_memory;

  std::unique_ptr<Image> dst;
  Progress progress(opts.progress, Progress::Unit::kBytes, DedupSoFar(dst), stdout);
  Destination out(opts.dst);
  auto created = Image::Create(opts.dst, create, std::move(open));
  if (!created.ok()) return out.Fail(opts.dst, created.status());
  dst = std::move(created).value();
  out.Claim();
  WarnIfNoSharing(opts.dst, create);  // a valid width, now that the image is made

  Status s;
  bool src_failed = false;
  if (from_stdin) {
    s = StreamInto(
        [&](std::span<uint8_t> buf) {
          auto r = ReadStdin(buf);
          if (!r.ok()) src_failed = true;
          return r;
        },
        *dst, progress.fn(), opts.flush_interval, opts.compress);
  } else {
    BlamedSource blamed(*src);
    s = CopyInto(blamed, *dst, progress.fn(),
                 {.target = TargetState::kZero,
                  .sparse_size = opts.sparse_size,
                  .flush_interval = opts.flush_interval,
                  .compress = opts.compress,
                  .base = base.get()});
    src_failed = blamed.failed;
  }
  if (s.ok()) s = dst->AddBitmaps(bitmaps);
  if (s.ok()) s = dst->Close();
  if (!s.ok()) {
    dst.reset();  // release the image (and its lock) before removing it
    return out.Fail(src_failed ? DisplayName(opts.src) : opts.dst, s);
  }
  progress.Finish();
  if (opts.progress) PrintWriteSummary(dst->write_stats());
  return 0;
}

// -n: into an existing target, as qemu-img convert -n. Nothing is created
// and nothing removed on failure: the target is the caller's.
CopyOptions IntoExistingOptions() {
  return {.target = opts.target_is_zero ? TargetState::kZero : TargetState::kAnyData,
          .sparse_size = opts.sparse_size,
          .flush_interval = opts.flush_interval,
          .cache = opts.cache,
          .compress = opts.compress};
}

int IntoExistingQcow2(BlockDevice& src) {
  OpenOptions open;
  if (Status s = ParseSessionOptions(opts.options, open.index_memory); !s.ok()) return Fail(opts.dst, s);
  open.writable = true;
  open.verify = opts.verify;
  open.cache = opts.cache;
  std::unique_ptr<Image> dst;
  Progress progress(opts.progress, Progress::Unit::kBytes, DedupSoFar(dst), stdout);
  auto opened = Image::Open(opts.dst, std::move(open));
  if (!opened.ok()) return Fail(opts.dst, opened.status());
  dst = std::move(opened).value();
  if (dst->virtual_size() < src.virtual_size()) return Fail("", "output file is smaller than input file");
  // --bitmaps: the source's, checked against the target's before a byte is
  // copied (qemu-img refuses a name the target has, in these words).
  std::vector<PersistentBitmap> bitmaps;
  if (opts.bitmaps) {
    auto* image = dynamic_cast<Image*>(&src);
    if (!image) return Fail("", "Source lacks bitmap support");
    auto read = image->ReadBitmaps();
    if (!read.ok()) return Fail(SourceWhat(), read.status());
    bitmaps = std::move(read).value();
    auto present = dst->ReadBitmaps();
    if (!present.ok()) return Fail(opts.dst, present.status());
    // qemu-img meets them last first (QEMU lists loaded bitmaps that way).
    for (auto b = bitmaps.rbegin(); b != bitmaps.rend(); ++b)
      for (const PersistentBitmap& t : *present)
        if (b->info.name == t.info.name)
          return Fail("", fmt::format("Failed to create bitmap {}: Bitmap already exists: {}", b->info.name, b->info.name));
    if (!bitmaps.empty() && !present->empty())
      return Fail(opts.dst, "has persistent bitmaps already (--bitmaps with -n needs a target without any)");
  }
  BlamedSource blamed(src);
  Status s = CopyInto(blamed, *dst, progress.fn(), IntoExistingOptions());
  if (s.ok()) s = dst->AddBitmaps(bitmaps);
  if (s.ok()) s = dst->Close();
  if (!s.ok()) return Fail(blamed.failed ? opts.src : opts.dst, s);
  progress.Finish();
  if (opts.progress) PrintWriteSummary(dst->write_stats());
  return 0;
}

int IntoExistingRaw(BlockDevice& src) {
  auto file = OpenPosixFile(opts.dst, OpenMode::kReadWrite);
  if (!file.ok()) return Fail(opts.dst, file.status());
  Status s = (*file)->Lock(LockMode::kExclusive);
  if (!s.ok()) return Fail(opts.dst, s);
  auto size = (*file)->Size();
  if (!size.ok()) return Fail(opts.dst, size.status());
  if (*size < src.virtual_size()) return Fail("", "output file is smaller than input file");
  Progress progress(opts.progress, Progress::Unit::kBytes, {}, stdout);
  BlamedSource blamed(src);
  s = ExportRaw(blamed, **file, progress.fn(), IntoExistingOptions());
  if (!s.ok()) return Fail(blamed.failed ? opts.src : opts.dst, s);
  progress.Finish();
  return 0;
}

int IntoExisting() {
  if (opts.src == "-") return Fail(DisplayName(opts.src), "cannot be converted with -n (its size is not known)");
  if (opts.out_format == "raw" && !opts.options.empty())
    return Fail("", "-o has no effect when skipping image creation");  // raw has no index
  auto src = OpenSource();
  if (!src.ok()) return Fail(SourceWhat(), src.status());
  return opts.out_format == "raw" ? IntoExistingRaw(**src) : IntoExistingQcow2(**src);
}

int ToRaw() {
  if (opts.src == "-") return Fail(DisplayName(opts.src), "can only be converted to qcow2");
  auto src = OpenSource();
  if (!src.ok()) return Fail(SourceWhat(), src.status());
  Destination out(opts.dst);
  // Holes stand for zeros, so old contents must go: only regular files.
  if (out.existed() && !IsRegularFile(opts.dst))
    return Fail(opts.dst, "not a regular file (raw output goes to regular files only)");
  if (out.existed() && !opts.force) return Fail(opts.dst, "file exists (use --force to replace it)");
  auto file = OpenPosixFile(opts.dst, opts.force ? OpenMode::kCreateOrOpen : OpenMode::kCreate);
  if (!file.ok()) return out.Fail(opts.dst, file.status());
  Status s = (*file)->Lock(LockMode::kExclusive);
  if (!s.ok()) return out.Fail(opts.dst, s);
  out.Claim();
  // Only a file that existed is emptied: on ext4 a truncate to 0 marks the
  // file as replaced, and closing it then waits for its data to be
  // allocated and written out (0.6 s for a 3 GiB export, unsafe or not).
  if (out.existed()) s = (*file)->Truncate(0);
  Progress progress(opts.progress, Progress::Unit::kBytes, {}, stdout);
  BlamedSource blamed(**src);
  if (s.ok()) s = ExportRaw(blamed, **file, progress.fn(), {TargetState::kZero, opts.sparse_size, 0, opts.cache});
  if (!s.ok()) {
    file->reset();
    return out.Fail(blamed.failed ? opts.src : opts.dst, s);
  }
  progress.Finish();
  return 0;
}

}  // namespace

void SetupConvert(CLI::App& app) {
  AddFormatOption(app, opts.src_format, "Source format (default: probe; standard input is raw)");
  app.add_option("-O", opts.out_format, "Output format: qcow2 (default) or raw")
      ->check(CLI::IsMember({"qcow2", "raw"}))
      ->option_text("qcow2|raw");
  app.add_option("-o", opts.options,
                 "Output options: cluster_size=SIZE, refcount_bits=N, lazy_refcounts=on|off, compression_type=zlib|zstd, "
                 "verify=on|off, index_memory=SIZE (alone with -n)")
      ->option_text("OPTIONS")
      ->allow_extra_args(false)
      ->each([](const std::string& v) {
        // -O is defined first, so its value is in by now.
        if (AsksForHelp(v) && opts.out_format == "raw") PrintRawOptionsHelp();
        if (AsksForHelp(v)) PrintImageOptionsHelp(/*allow_verify=*/true);
      });
  app.add_flag("-c", opts.compress,
               "Store data compressed (-o compression_type, zlib by default), each distinct cluster once");
  app.add_flag("-p,--progress", opts.progress, "Show progress on stdout (as qemu-img)");
  app.add_flag("-q,--quiet", opts.quiet, "Print nothing (overrides -p)");
  AddCacheOption(app, opts.cache);
  AddFlushIntervalOption(app, opts.flush_interval);
  AddBackingOptions(app, "-B", opts.backing);
  app.add_flag("--force", opts.force, "Replace DST if it exists");
  app.add_flag("-n", opts.no_create,
               "Convert into the existing DST (an image, a block device, a preallocated file) without creating it");
  app.add_flag("--target-is-zero", opts.target_is_zero, "With -n: DST reads as zeros already; write no zeros");
  app.add_flag("--bitmaps", opts.bitmaps, "Copy SRC's persistent dirty bitmaps (names, granularity, flags, bits)");
  app.add_flag("--verify", opts.verify, "Compare bytes before sharing a cluster (not only hashes)");
  AddForceShareOption(app, opts.force_share);
  app.add_option("-l", opts.snapshot, "Convert this internal snapshot of SRC (ID or NAME, or snapshot.id=ID,snapshot.name=NAME)")
      ->option_text("SNAPSHOT");
  app.add_option("-S", opts.sparse,
                 "Zero-detection size (default 4k): a multiple of 512 up to 16M; 0 writes zeros as data")
      ->option_text("SIZE");
  app.add_option("SRC", opts.src, "Source image, or - for standard input")->required();
  app.add_option("DST", opts.dst, "Destination image")->required();
}

int RunConvert() {
  if (opts.quiet) opts.progress = false;
  if (opts.src == "-" && opts.src_format == ImageFormat::kQcow2)
    return Fail(DisplayName(opts.src), "can only be read as raw");
  if (opts.src != "-" && SameFile(opts.src, opts.dst))
    return Fail(opts.dst, "is the source itself; convert to another file");
  // qemu-img's checks and words.
  constexpr uint64_t kMaxSparse = 16u << 20;  // qemu-img's MAX_BUF_SECTORS
  auto sparse = ParseSizeInRange("buffer size for sparse output", opts.sparse, 0, UINT64_MAX);
  if (!sparse.ok()) return Fail("", sparse.status());
  if (*sparse % 512 || *sparse > kMaxSparse)
    return Fail("", "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                    "16777216. Select 0 to disable sparse detection (fully allocates output).");
  opts.sparse_size = *sparse;
  if (opts.target_is_zero && !opts.no_create) return Fail("", "--target-is-zero requires use of -n flag");
  // -n takes index_memory alone: the target's format options are its own.
  if (opts.no_create && !OnlySessionOptions(opts.options))
    return Fail("", "-o has no effect when skipping image creation");
  if (opts.bitmaps && opts.out_format == "raw") return Fail("", "Format driver 'raw' does not support bitmaps");
  if (opts.bitmaps && opts.src == "-") return Fail("", "Source lacks bitmap support");
  if (opts.backing.given() && opts.out_format == "raw")
    return Fail("", "Backing file not supported for file format 'raw'");
  if (opts.backing.given() && opts.no_create)
    return Fail(opts.dst, "-B makes a new overlay; it cannot be used with -n");
  if (opts.backing.given() && opts.src == "-")
    return Fail(DisplayName(opts.src), "cannot be converted with -B (it is read once, in one pass)");
  if (opts.no_create) return IntoExisting();
  if (opts.out_format == "raw") {
    // A raw file has no options, nothing is shared that could be verified,
    // and no tables that a flush could put on disk early.
    if (!opts.options.empty() || opts.verify || opts.flush_interval || opts.compress)
      return Fail(opts.dst, "-o, -c, --verify and --flush-interval apply to qcow2 output only");
    return ToRaw();
  }
  ImageOptions o;
  if (Status s = ParseImageOptions(opts.options, /*allow_verify=*/true, o); !s.ok()) return Fail(opts.dst, s);
  return ToQcow2(o);
}

}  // namespace qcow2dedup::cli
