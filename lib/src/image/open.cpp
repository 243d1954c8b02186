// Opening images: the header, the tables, the backing chain, the locks.
#include <fmt/format.h>
#include <sys/stat.h>

#include <climits>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <set>

#include "image/image_state.h"
#include "qcow2dedup/check.h"
#include "image/raw_device.h"
#include "image/writer.h"
#include "io/unsynced_file.h"

namespace qcow2dedup {

namespace {

constexpr int kMaxBackingDepth = 1000;

std::string RealPath(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : path;
}

struct Chain {
  std::set<std::string> seen;
  int depth = 0;
};

Result<std::unique_ptr<BlockDevice>> OpenAny(const std::string& path, ImageFormat format, bool force_share,
                                             Chain& chain);

Result<std::unique_ptr<Image>> OpenQcow2(const std::string& path, OpenOptions& opts, Chain& chain);

Result<bool> HasQcowMagic(File& f) {
  uint8_t m[4];
  QD_ASSIGN_OR_RETURN(uint64_t size, f.Size());
  if (size < 4) return false;
  QD_RETURN_IF_ERROR(f.ReadAt(0, m));
  return m[0] == 'Q' && m[1] == 'F' && m[2] == 'I' && m[3] == 0xfb;
}

Result<std::unique_ptr<BlockDevice>> OpenAny(const std::string& path, ImageFormat format, bool force_share,
                                             Chain& chain) {
  if (format != ImageFormat::kRaw) {
    QD_ASSIGN_OR_RETURN(auto f, OpenPosixFile(path, OpenMode::kReadOnly));
    QD_ASSIGN_OR_RETURN(bool qcow, HasQcowMagic(*f));
    if (qcow || format == ImageFormat::kQcow2) {
      OpenOptions o;
      o.force_share = force_share;
      o.file = std::move(f);
      QD_ASSIGN_OR_RETURN(auto img, OpenQcow2(path, o, chain));
      return std::unique_ptr<BlockDevice>(std::move(img));
    }
  }
  QD_ASSIGN_OR_RETURN(auto f, OpenPosixFile(path, OpenMode::kReadOnly));
  if (!force_share) QD_RETURN_IF_ERROR(f->Lock(LockMode::kShared));
  QD_ASSIGN_OR_RETURN(uint64_t size, f->Size());
  return std::unique_ptr<BlockDevice>(new RawDevice(std::move(f), size));
}

Status OpenBacking(ImageState& s, bool force_share, Chain& chain) {
  const Header& h = s.header;
  if (h.backing_file.empty()) return Status::Ok();
  std::string name = h.backing_file;
  if (name.find(':') != std::string::npos && name.rfind("file:", 0) == 0) name = name.substr(5);
  if (name.empty() || name.find('\0') != std::string::npos)
    return Status::Corruption("backing file name is not a plain file name");
  std::string full = BackingPath(s.path, name);
  s.full_backing_path = full;
  if (++chain.depth > kMaxBackingDepth) return Status::Corruption("backing chain is too deep");
  ImageFormat fmt = ImageFormat::kAuto;
  if (h.backing_format == "raw") fmt = ImageFormat::kRaw;
  else if (h.backing_format == "qcow2") fmt = ImageFormat::kQcow2;
  else if (h.backing_format && !h.backing_format->empty())
    return Status::Unsupported(fmt::format("backing file format '{}' is not supported", *h.backing_format));
  auto dev = OpenAny(full, fmt, force_share, chain);
  if (!dev.ok()) return dev.status().Prefixed(fmt::format("backing file '{}'", full));
  s.backing = std::move(dev).value();
  return Status::Ok();
}

Result<Header> ReadHeader(File& file, uint64_t file_size) {
  // Cluster 0, which bounds everything the header holds: 4 KiB first, the
  // rest once cluster_bits says there is more (not 2 MiB, the largest
  // cluster, on every open). Bits out of range are ParseHeader's to name.
  constexpr uint64_t kFirst = 4096;
  std::vector<uint8_t> head(std::min<uint64_t>(file_size, kFirst));
  QD_RETURN_IF_ERROR(file.ReadAt(0, head));
  if (head.size() >= offsetof(RawHeader, cluster_bits) + sizeof(be32)) {
    const uint32_t bits = *reinterpret_cast<const be32*>(&head[offsetof(RawHeader, cluster_bits)]);
    if (bits >= kMinClusterBits && bits <= kMaxClusterBits && (uint64_t(1) << bits) > head.size() &&
        file_size > head.size()) {
      head.resize(std::min<uint64_t>(file_size, uint64_t(1) << bits));
      QD_RETURN_IF_ERROR(file.ReadAt(kFirst, std::span(head).subspan(kFirst)));
    }
  }
  return ParseHeader(head, file_size);
}

Result<std::unique_ptr<Image>> OpenQcow2(const std::string& path, OpenOptions& opts, Chain& chain) {
  std::unique_ptr<File> file = std::move(opts.file);
  if (!file) {
    QD_ASSIGN_OR_RETURN(file, OpenPosixFile(path, opts.writable ? OpenMode::kReadWrite : OpenMode::kReadOnly));
  }
  file = WithCacheMode(std::move(file), opts.cache);
  if (!chain.seen.insert(RealPath(path)).second)
    return Status::Corruption("backing chain loops back to " + path);
  if (!opts.force_share || opts.writable)
    QD_RETURN_IF_ERROR(file->Lock(opts.writable ? LockMode::kExclusive : LockMode::kShared));
  QD_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  QD_ASSIGN_OR_RETURN(Header h, ReadHeader(*file, file_size));
  if (opts.writable && (h.incompatible & kIncompatCorrupt))
    return Status::Corruption("the image is marked corrupt; repair it with check -r all first");
  if (opts.writable && (h.incompatible & kIncompatDirty)) {
    // Not closed cleanly (a crash, or a kill): QEMU repairs such an image
    // when it opens it for writing, and so do we.
    QD_RETURN_IF_ERROR(CheckWritableFormat(h));
    QD_ASSIGN_OR_RETURN(CheckReport r, CheckFile(*file, path, RepairMode::kAll, opts.progress));
    if (r.corruptions || r.check_errors)
      return Status::Corruption(fmt::format(
          "the image was not closed cleanly and its repair left {} errors; see 'check'", r.corruptions + r.check_errors));
    QD_ASSIGN_OR_RETURN(file_size, file->Size());
    QD_ASSIGN_OR_RETURN(h, ReadHeader(*file, file_size));
  }

  auto s = std::make_unique<ImageState>(path, std::move(file), std::move(h));
  s->file_size = file_size;
  s->verify = opts.verify;
  s->index_memory = opts.index_memory;
  if (s->header.nb_snapshots > 0) {
    QD_ASSIGN_OR_RETURN(s->snapshots, ReadSnapshotTable(*s->file, s->header, file_size));
    s->meta.set_snapshot_table_bytes(s->snapshots.bytes);
    for (const Snapshot& snap : s->snapshots.snapshots) s->meta.AddSnapshotL1(snap.l1_offset, uint64_t(snap.l1_size) * 8);
  }
  const uint64_t cache_tables = CacheTables(s->cs(), opts.metadata_cache_bytes);
  s->map = std::make_unique<ClusterMap>(s->file.get(), &s->header, &s->meta, cache_tables);
  QD_RETURN_IF_ERROR(s->map->Load(file_size));
  if (!s->header.backing_file.empty() && !opts.follow_backing)
    return Status::Unsupported("backing files are not followed here");
  QD_RETURN_IF_ERROR(OpenBacking(*s, opts.force_share, chain));
  if (opts.writable) {
    QD_ASSIGN_OR_RETURN(s->writer, Writer::Start(*s, cache_tables, opts.progress));
  }
  return ImageAccess::Make(std::move(s));
}

}  // namespace

ImageState::ImageState(std::string p, std::unique_ptr<File> f, Header h)
    : path(std::move(p)), file(std::move(f)), header(std::move(h)), meta(header) {}
ImageState::~ImageState() = default;

Status ImageState::FlushPendingData(uint64_t offset, uint64_t len) {
  return writer ? writer->FlushDataOverlapping(offset, len) : Status::Ok();
}


// Relative names are relative to the image's directory (as QEMU shows them).
std::string BackingPath(const std::string& image_path, const std::string& name) {
  const bool bare = image_path.find('/') == std::string::npos;
  return name.empty() || name[0] == '/' || bare ? name : DirectoryOf(image_path) + "/" + name;
}

Image::Image(std::unique_ptr<ImageState> s) : state_(std::move(s)) {}
Image::~Image() = default;

Result<std::unique_ptr<Image>> Image::Open(const std::string& path, OpenOptions options) {
  Chain chain;
  return OpenQcow2(path, options, chain);
}

Result<std::unique_ptr<BlockDevice>> OpenBlockDevice(const std::string& path, ImageFormat format,
                                                     bool force_share) {
  Chain chain;
  return OpenAny(path, format, force_share, chain);
}

uint64_t Image::virtual_size() const { return state_->header.virtual_size; }
uint64_t Image::cluster_size() const { return state_->cs(); }

ImageInfo Image::Info() const {
  const ImageState& s = *state_;
  const Header& h = s.header;
  ImageInfo info;
  info.filename = s.path;
  info.virtual_size = h.virtual_size;
  struct stat st;
  if (::stat(s.path.c_str(), &st) == 0) info.actual_size = uint64_t(st.st_blocks) * 512;
  info.cluster_size = s.cs();
  info.version = h.version;
  info.dirty = h.incompatible & kIncompatDirty;
  info.corrupt = h.incompatible & kIncompatCorrupt;
  info.lazy_refcounts = h.lazy_refcounts();
  info.extended_l2 = h.extended_l2();
  info.refcount_bits = h.refcount_bits();
  info.compression_type = h.compression == CompressionType::kZstd ? "zstd" : "zlib";
  info.backing_file = h.backing_file;
  info.full_backing_file = s.full_backing_path;
  if (h.backing_format) info.backing_format = *h.backing_format;
  for (auto& snap : s.snapshots.snapshots) info.snapshots.push_back(snap.info);
  if (h.dedup) {
    info.dedup.present = true;
    info.dedup.in_sync = h.dedup_in_sync();
    info.dedup.hash_algorithm = h.dedup->hash_algorithm == kHashSha256 ? "sha256" : "unknown";
    if (info.dedup.in_sync) info.dedup.stored_clusters = h.dedup->index_entries;
  }
  return info;
}

}  // namespace qcow2dedup
