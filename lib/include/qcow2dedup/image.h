// The qcow2dedup library: open, create, read and write qcow2 images, with
// identical clusters stored once. The library never parses arguments or
// prints; the CLI in apps/ does.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qcow2dedup/file.h"
#include "qcow2dedup/status.h"

// The library's own: not exported.
namespace qcow2dedup {
class ImageState;
}

#pragma GCC visibility push(default)  // the public API: exported from the shared library

namespace qcow2dedup {

// Called now and then during long work with how far it got.
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

// Something with a guest view: a raw file, a block device or a qcow2 image.
class BlockDevice {
 public:
  virtual ~BlockDevice() = default;
  virtual uint64_t virtual_size() const = 0;
  // Reads guest bytes; past the virtual size is an error.
  virtual Status Read(uint64_t offset, std::span<uint8_t> buf) = 0;
  // How many bytes from offset are known to read as zero (0 if the byte at
  // offset may hold data). Lets readers skip holes without reading them.
  virtual Result<uint64_t> ZeroRun(uint64_t offset) { (void)offset; return uint64_t(0); }
  // A hint that [offset, offset + len) will be read soon. Called the way
  // Read is (one thread at a time).
  virtual void Prefetch(uint64_t offset, uint64_t len) { (void)offset, (void)len; }
  virtual std::string format() const = 0;
};

enum class ImageFormat { kAuto, kRaw, kQcow2 };

// Opens a raw file or any qcow2 image read-only (format kAuto probes the magic).
Result<std::unique_ptr<BlockDevice>> OpenBlockDevice(const std::string& path, ImageFormat format,
                                                     bool force_share = false);

// How compressed clusters are compressed (qemu-img's compression_type).
enum class Compression { kZlib, kZstd };

struct CreateOptions {
  uint64_t virtual_size = 0;
  Compression compression_type = Compression::kZlib;
  uint32_t cluster_size = 65536;
  uint32_t refcount_bits = 16;
  bool lazy_refcounts = false;
  bool force = false;  // replace an existing file
  // An overlay (qemu-img create -b NAME -F FORMAT): the backing file's name
  // as stored in the header (a relative one is relative to the image's
  // directory, see BackingPath) and its format, "raw" or "qcow2". The
  // backing file must open: the new image is opened with it.
  std::string backing_file;
  std::string backing_format;
};

// Where the backing file named `name` in the header of the image at
// image_path lies, as QEMU resolves it: an absolute name as is, a
// relative one relative to the image's directory.
std::string BackingPath(const std::string& image_path, const std::string& name);

// When written data is made durable (qemu-img -t).
enum class CacheMode {
  kWriteback,  // sync in the order that keeps a crash repairable, and at close
  kUnsafe,     // never sync: safe against a kill, not against a power cut
};

struct OpenOptions {
  bool writable = false;
  CacheMode cache = CacheMode::kWriteback;
  bool force_share = false;  // read without QEMU's lock, as qemu-img -U
  bool verify = false;       // compare bytes before sharing a cluster
  // Opens a file supplied by the caller instead of the path (tests inject faults).
  std::unique_ptr<File> file;
  // False: an image with a backing file is refused (fuzzing must not open
  // whatever file name an input carries).
  bool follow_backing = true;
  // Reports progress of an index rebuild.
  ProgressFn progress;
  // Memory for each metadata cache (L2 tables, refcount blocks); 0: 32 MiB,
  // as QEMU's default L2 cache.
  uint64_t metadata_cache_bytes = 0;
  // A cap on the dedup index's memory (-o index_memory); 0: none. Past it,
  // data is still written, but not indexed: later copies of it are stored
  // again (never linked wrongly), and WriteStats::unindexed_clusters and
  // the image's header count them (check, dedup-stats).
  uint64_t index_memory = 0;
};

// Where this process remembers the images its write sessions closed
// cleanly, so that a later writable open of one unchanged since (same
// inode, size and change time) skips the full metadata pass. Empty, the
// default: nothing is remembered and every writable open runs the pass.
// Set once, before opening images; the file never grows past 256 KiB.
void SetVettedStampsPath(std::string path);
// $XDG_CACHE_HOME/qcow2dedup/vetted, or ~/.cache/qcow2dedup/vetted; empty
// if neither is known.
std::string DefaultVettedStampsPath();

struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t vm_state_size = 0;
  uint64_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t icount = ~0ull;  // ~0: not recorded
};

struct ImageInfo {
  std::string filename;
  uint64_t virtual_size = 0;
  uint64_t actual_size = 0;  // bytes the file occupies on disk
  uint64_t cluster_size = 0;
  uint32_t version = 3;
  bool dirty = false;
  bool corrupt = false;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  uint32_t refcount_bits = 16;
  std::string compression_type;  // "zlib" or "zstd"
  std::string backing_file;       // as stored
  std::string full_backing_file;  // resolved
  std::string backing_format;
  std::vector<SnapshotInfo> snapshots;
  struct Dedup {
    bool present = false;  // our header extension exists
    bool in_sync = false;  // our autoclear bit is set
    std::string hash_algorithm;
    std::optional<uint64_t> stored_clusters;  // entries of an in-sync index
  } dedup;
};

// A persistent dirty bitmap (qemu-img bitmap --add), as qemu-img info lists it.
struct BitmapInfo {
  std::string name;
  uint64_t granularity = 0;  // bytes each bit stands for
  bool in_use = false;       // a QEMU had it open and did not stop cleanly
  bool auto_enabled = false; // QEMU tracks writes in it ("auto")
};

// A persistent bitmap with its dirty bits (convert --bitmaps): bit i,
// bit i % 8 of bits[i / 8], stands for guest bytes [i * granularity,
// (i + 1) * granularity).
struct PersistentBitmap {
  BitmapInfo info;
  std::vector<uint8_t> bits;
};

// Counters of one write session (or one convert).
struct WriteStats {
  uint64_t clusters_written = 0;  // guest clusters the caller wrote
  uint64_t zero_clusters = 0;     // of them, all zero
  uint64_t dedup_hits = 0;        // linked to a cluster already stored
  uint64_t new_clusters = 0;      // stored anew
  uint64_t unindexed_clusters = 0;  // of them, not indexed: the index had reached index_memory
  uint64_t compressed_clusters = 0;  // of them, stored compressed
  uint64_t compressed_bytes = 0;     // the compressed bytes those take
  uint64_t freed_clusters = 0;    // host clusters whose last reference went
};

// A whole guest cluster on its way to the write path, hashed in advance so
// that callers (convert) can spread hashing over threads.
struct ClusterWrite {
  uint64_t guest_cluster;
  std::span<const uint8_t> data;  // exactly one cluster
  bool zero;
  std::array<uint8_t, 32> digest;  // SHA-256 of data (unused when zero)
  // Stored anew, store it compressed with the image's compression type
  // (convert -c), unless that saves less than a 512-byte sector.
  bool compress = false;
  // With compress: data already compressed by the caller (empty: the write
  // path compresses it if it must store it).
  std::span<const uint8_t> compressed = {};
};

// Hashes a cluster the way the write path expects (fills zero and digest).
void PrepareClusterWrite(ClusterWrite& w);

class Image : public BlockDevice {
 public:
  ~Image() override;
  static Result<std::unique_ptr<Image>> Open(const std::string& path, OpenOptions options);
  // Creates an empty dedup image and opens it for writing (in open.file, if
  // given, instead of the path).
  static Result<std::unique_ptr<Image>> Create(const std::string& path, const CreateOptions& options,
                                               OpenOptions open = {});

  uint64_t virtual_size() const override;
  uint64_t cluster_size() const;
  std::string format() const override { return "qcow2"; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override;
  Result<uint64_t> ZeroRun(uint64_t offset) override;
  // Asks the kernel for the host clusters behind [offset, offset + len);
  // not thread-safe beside Read (it looks the range up as a read does).
  void Prefetch(uint64_t offset, uint64_t len) override;

  // The dedup write path. Write takes any offset and length; WriteClusters
  // takes whole clusters in any order.
  Status Write(uint64_t offset, std::span<const uint8_t> data);
  Status WriteClusters(std::span<const ClusterWrite> clusters);
  // Changes the virtual size: grows (the L1 table moves if it must), or
  // shrinks when nothing is stored past the new end.
  Status Resize(uint64_t new_size);
  // Makes everything written so far durable (the image stays marked dirty).
  Status Flush();
  // Flushes, stores the dedup index and marks the image clean. Without Close
  // a writable image is left as after a crash.
  Status Close();

  ImageInfo Info() const;
  // Reads an internal snapshot's guest view instead of the current one
  // (read-only images only; qemu-img convert -l). The first snapshot whose
  // id is id and whose name is name matches (an absent one matches any);
  // kNotFound when none does. The virtual size becomes the snapshot's.
  Status SelectSnapshot(const std::optional<std::string>& id, const std::optional<std::string>& name);
  // The persistent dirty bitmaps, in the directory's order (none unless
  // QEMU's bitmaps autoclear bit vouches for the directory).
  Result<std::vector<BitmapInfo>> Bitmaps() const;
  // Them with their dirty bits; an in-use one (inconsistent) is an error,
  // as qemu-img convert --bitmaps refuses it.
  Result<std::vector<PersistentBitmap>> ReadBitmaps() const;
  // Adds bitmaps to a writable image that has none, bits as given (and
  // from then on not marked by this session's writes: call it after them).
  Status AddBitmaps(const std::vector<PersistentBitmap>& bitmaps);
  const WriteStats& write_stats() const;
  // Bytes of heap the in-memory dedup index holds.
  size_t index_memory() const;

  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;

 private:
  [[gnu::visibility("hidden")]] explicit Image(std::unique_ptr<ImageState> s);
  friend class ImageAccess;  // the library's own, not exported
  std::unique_ptr<ImageState> state_;
};

}  // namespace qcow2dedup

#pragma GCC visibility pop
