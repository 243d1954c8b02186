// nbdkit-qcow2dedup-plugin: exports a dedup image over NBD, every write
// going through the library's dedup write path. nbdkit owns the protocol,
// connections, threads and signals; this file owns the image.
//
// One Image for all connections, guarded by one mutex (Image is not
// thread-safe). Whole clusters are hashed before the lock is taken, so that
// hashing, the costly part of a write, runs on all of nbdkit's threads at
// once; only the table updates and data writes are serialized. Because all
// connections share the one image and its one flush, multi-conn is true.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "qcow2dedup/image.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

namespace {

using qcow2dedup::ClusterWrite;
using qcow2dedup::ErrorKind;
using qcow2dedup::Image;
using qcow2dedup::Status;

struct Config {
  std::string file;      // absolute: nbdkit serves from /
  std::string name;      // the image as the user named it, for messages
  std::string uri;       // printed once serving; empty: print nothing
  bool readonly = false;
  bool unsafe = false;   // -t unsafe: never sync
  bool progress = false; // show an index rebuild's progress
  uint64_t index_memory = 0;  // bytes the dedup index may take (0: no cap)
} config;

// Set in .get_ready, reset in .cleanup; used only with image_mutex held.
std::unique_ptr<Image> image;
std::mutex image_mutex;
uint64_t virtual_size = 0;
std::vector<uint8_t> zero_cluster;  // a cluster of zeros for zero requests
uint64_t cluster_size = 0;

// Zero requests hold the lock for this many clusters at a time, so that a
// huge trim does not stall every other request.
constexpr uint64_t kZeroBatchClusters = 1024;

int ErrnoFor(const Status& s) {
  switch (s.kind()) {
    case ErrorKind::kNoSpace: return ENOSPC;
    case ErrorKind::kInvalidArgument: return EINVAL;
    case ErrorKind::kUnsupported: return ENOTSUP;
    default: return EIO;
  }
}

// Reports a failed request to nbdkit (its log and the client's errno).
int Failed(const char* what, const Status& s) {
  nbdkit_error("%s: %s: %s", config.name.c_str(), what, s.message().c_str());
  nbdkit_set_error(ErrnoFor(s));
  return -1;
}

// No exception may cross into nbdkit's C code.
template <class F>
int Guarded(const char* what, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    nbdkit_error("%s: %s: %s", config.name.c_str(), what, e.what());
  } catch (...) {
    nbdkit_error("%s: %s: unexpected exception", config.name.c_str(), what);
  }
  nbdkit_set_error(EIO);
  return -1;
}

int Config(const char* key, const char* value) {
  const std::string k = key;
  if (k == "file") {
    char* abs = nbdkit_absolute_path(value);
    if (!abs) return -1;
    config.file = abs;
    std::free(abs);
    return 0;
  }
  if (k == "name") {
    config.name = value;
    return 0;
  }
  if (k == "uri") {
    config.uri = value;
    return 0;
  }
  if (k == "index_memory") {
    // serve parses and checks the size; a bare nbdkit gets nbdkit's sizes.
    const int64_t n = nbdkit_parse_size(value);
    if (n <= 0) {
      nbdkit_error("index_memory must be a size of at least 1 byte, not '%s'", value);
      return -1;
    }
    config.index_memory = uint64_t(n);
    return 0;
  }
  if (k == "readonly" || k == "unsafe" || k == "progress") {
    const int b = nbdkit_parse_bool(value);
    if (b < 0) return -1;
    (k == "readonly" ? config.readonly : k == "unsafe" ? config.unsafe : config.progress) = b;
    return 0;
  }
  nbdkit_error("unknown parameter '%s' (qcow2dedup takes file, name, readonly, unsafe, progress, index_memory, uri)", key);
  return -1;
}

int ConfigComplete() {
  if (config.file.empty()) {
    nbdkit_error("no image: give file=IMAGE");
    return -1;
  }
  if (config.name.empty()) config.name = config.file;
  return 0;
}

// Before nbdkit forks or binds its sockets: a bad image or one in use is
// reported on stderr, and nbdkit exits non-zero before serving anything.
int GetReady() {
  return Guarded("open", [] {
    qcow2dedup::SetVettedStampsPath(qcow2dedup::DefaultVettedStampsPath());
    qcow2dedup::OpenOptions o;
    o.writable = !config.readonly;
    o.cache = config.unsafe ? qcow2dedup::CacheMode::kUnsafe : qcow2dedup::CacheMode::kWriteback;
    o.index_memory = config.index_memory;
    if (config.progress)
      o.progress = [](uint64_t done, uint64_t total) {
        if (total) std::fprintf(stderr, "\rqcow2dedup: rebuilding the dedup index: %3u%%", unsigned(done * 100 / total));
        if (done == total) std::fputc('\n', stderr);
      };
    auto opened = Image::Open(config.file, std::move(o));
    if (!opened.ok()) {
      // The one line every qcow2dedup command prints (nbdkit_error would
      // prefix "nbdkit: error:"); nbdkit then exits 1 and adds nothing.
      std::fprintf(stderr, "qcow2dedup: %s: %s\n", config.name.c_str(), opened.status().message().c_str());
      return -1;
    }
    image = std::move(opened).value();
    cluster_size = image->cluster_size();
    virtual_size = image->virtual_size();
    zero_cluster.assign(cluster_size, 0);
    return 0;
  });
}

// Sockets are bound now: the URI can be used.
int AfterFork() {
  if (!config.uri.empty()) std::fprintf(stderr, "qcow2dedup: serving %s at %s\n", config.name.c_str(), config.uri.c_str());
  return 0;
}

// SIGINT, SIGTERM or the end of --run: store the index and mark the image clean.
void Cleanup() {
  // Under the lock: a request still running finishes first, and one that
  // comes later finds no image rather than a closed one.
  std::lock_guard lock(image_mutex);
  if (!image) return;
  Status s = image->Close();
  // What the session did, as `write -p` reports it.
  const qcow2dedup::WriteStats& w = image->write_stats();
  if (s.ok() && !config.readonly)
    std::fprintf(stderr, "qcow2dedup: %s: closed; %llu clusters written (%llu zero), %llu stored, %llu shared, %llu freed\n",
                 config.name.c_str(), (unsigned long long)w.clusters_written, (unsigned long long)w.zero_clusters,
                 (unsigned long long)w.new_clusters, (unsigned long long)w.dedup_hits,
                 (unsigned long long)w.freed_clusters);
  if (s.ok() && w.unindexed_clusters)
    std::fprintf(stderr, "qcow2dedup: %s: %llu of the stored clusters not indexed for lack of index memory\n",
                 config.name.c_str(), (unsigned long long)w.unindexed_clusters);
  image.reset();
  if (!s.ok()) {
    std::fprintf(stderr, "qcow2dedup: %s: closing the image failed: %s\n", config.name.c_str(), s.message().c_str());
    std::fflush(stderr);
    // nbdkit would still exit 0: a failed close must not look like success.
    std::_Exit(1);
  }
}

void* Open(int readonly) {
  (void)readonly;
  static int handle;  // every connection shares the one image
  return &handle;
}

int64_t GetSize(void*) { return int64_t(virtual_size); }

// With image_mutex held: false (and the client's errno set) once closed.
bool StillOpen() {
  if (image) return true;
  nbdkit_error("%s: the image is closed: the server is stopping", config.name.c_str());
  nbdkit_set_error(ESHUTDOWN);
  return false;
}

int BlockSize(void*, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  *minimum = 1;  // Write completes partial clusters itself
  *preferred = uint32_t(cluster_size);
  *maximum = 0xffffffff;
  return 0;
}

int CanWrite(void*) { return !config.readonly; }
int CanFlush(void*) { return 1; }
int CanTrim(void*) { return !config.readonly; }
int CanZero(void*) { return !config.readonly; }
// Zeroing whole clusters only rewrites L2 entries and refcounts.
int CanFastZero(void*) { return !config.readonly; }
int CanExtents(void*) { return 1; }
int CanFua(void*) { return NBDKIT_FUA_NATIVE; }
int CanMultiConn(void*) { return 1; }
int CanCache(void*) { return NBDKIT_CACHE_NONE; }

int Pread(void*, void* buf, uint32_t count, uint64_t offset, uint32_t) {
  return Guarded("read", [&] {
    std::lock_guard lock(image_mutex);
    if (!StillOpen()) return -1;
    Status s = image->Read(offset, {static_cast<uint8_t*>(buf), count});
    return s.ok() ? 0 : Failed("read", s);
  });
}

// Holds the image lock: makes what was written durable if FUA asked for it.
int FinishWrite(uint32_t flags) {
  if (!(flags & NBDKIT_FLAG_FUA)) return 0;
  Status s = image->Flush();
  return s.ok() ? 0 : Failed("flush", s);
}

// The whole clusters inside [offset, offset + count): those can be hashed
// before the lock and written with WriteClusters. A last cluster cut short
// by the virtual size goes through Write.
struct Split {
  uint64_t first = 0, end = 0;  // head [offset, first), whole [first, end), tail [end, offset + count)
};
Split WholeClusters(uint64_t offset, uint64_t count) {
  const uint64_t stop = offset + count;
  const uint64_t last_whole = virtual_size / cluster_size * cluster_size;
  const uint64_t first = std::min(stop, (offset + cluster_size - 1) / cluster_size * cluster_size);
  const uint64_t end = std::max(first, std::min(stop / cluster_size * cluster_size, last_whole));
  return {first, end};
}

int Pwrite(void*, const void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  return Guarded("write", [&] {
    const auto* data = static_cast<const uint8_t*>(buf);
    const Split w = WholeClusters(offset, count);
    std::vector<ClusterWrite> clusters;
    clusters.reserve((w.end - w.first) / cluster_size);
    for (uint64_t at = w.first; at < w.end; at += cluster_size) {
      ClusterWrite c{at / cluster_size, {data + (at - offset), cluster_size}, false, {}};
      qcow2dedup::PrepareClusterWrite(c);  // outside the lock: in parallel
      clusters.push_back(c);
    }
    std::lock_guard lock(image_mutex);
    if (!StillOpen()) return -1;
    if (w.first > offset)
      if (Status s = image->Write(offset, {data, w.first - offset}); !s.ok()) return Failed("write", s);
    if (!clusters.empty())
      if (Status s = image->WriteClusters(clusters); !s.ok()) return Failed("write", s);
    if (offset + count > w.end)
      if (Status s = image->Write(w.end, {data + (w.end - offset), offset + count - w.end}); !s.ok())
        return Failed("write", s);
    return FinishWrite(flags);
  });
}

// Zeroes [offset, offset + count): whole clusters drop their references (an
// unallocated entry, or the zero flag over a backing file), partial ones
// are rewritten with zeros in place. Trim is the same: a trimmed range may
// read as anything, and zeros also free the space.
int ZeroRange(uint64_t count, uint64_t offset, uint32_t flags, const char* what) {
  const Split w = WholeClusters(offset, count);
  const bool partial = w.first > offset || offset + count > w.end;
  // A fast zero promises no data writes; partial clusters need one.
  if ((flags & NBDKIT_FLAG_FAST_ZERO) && partial) {
    nbdkit_set_error(ENOTSUP);
    return -1;
  }
  auto zeros = [](uint64_t at, uint64_t n) {
    return image->Write(at, {zero_cluster.data(), size_t(n)});
  };
  {
    std::lock_guard lock(image_mutex);
    if (!StillOpen()) return -1;
    if (w.first > offset)
      if (Status s = zeros(offset, w.first - offset); !s.ok()) return Failed(what, s);
    if (offset + count > w.end)
      if (Status s = zeros(w.end, offset + count - w.end); !s.ok()) return Failed(what, s);
  }
  std::vector<ClusterWrite> batch;
  for (uint64_t at = w.first; at < w.end;) {
    batch.clear();
    for (; at < w.end && batch.size() < kZeroBatchClusters; at += cluster_size)
      batch.push_back(ClusterWrite{at / cluster_size, zero_cluster, true, {}});
    std::lock_guard lock(image_mutex);
    if (!StillOpen()) return -1;
    if (Status s = image->WriteClusters(batch); !s.ok()) return Failed(what, s);
  }
  std::lock_guard lock(image_mutex);
  if (!StillOpen()) return -1;
  return FinishWrite(flags);
}

int Zero(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  return Guarded("zero", [&] { return ZeroRange(count, offset, flags, "zero"); });
}

int Trim(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  return Guarded("trim", [&] { return ZeroRange(count, offset, flags & NBDKIT_FLAG_FUA, "trim"); });
}

int Flush(void*, uint32_t) {
  return Guarded("flush", [] {
    std::lock_guard lock(image_mutex);
    if (!StillOpen()) return -1;
    Status s = image->Flush();
    return s.ok() ? 0 : Failed("flush", s);
  });
}

// base:allocation from the L2 tables: runs that read as zero without
// holding data (unallocated or the zero flag) are holes; the rest is data.
int Extents(void*, uint32_t count, uint64_t offset, uint32_t flags, struct nbdkit_extents* extents) {
  return Guarded("block status", [&] {
    std::lock_guard lock(image_mutex);
    if (!StillOpen()) return -1;
    const uint64_t end = std::min<uint64_t>(virtual_size, offset + count);
    const bool one = flags & NBDKIT_FLAG_REQ_ONE;
    for (uint64_t at = offset; at < end;) {
      auto zero = image->ZeroRun(at);
      if (!zero.ok()) return Failed("block status", zero.status());
      uint64_t n = std::min<uint64_t>(*zero, end - at);
      uint32_t type = NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO;
      if (n == 0) {
        // Data: up to the next cluster that reads as zero.
        type = 0;
        uint64_t next = std::min<uint64_t>(end, (at / cluster_size + 1) * cluster_size);
        while (next < end) {
          auto z = image->ZeroRun(next);
          if (!z.ok()) return Failed("block status", z.status());
          if (*z) break;
          next = std::min<uint64_t>(end, next + cluster_size);
        }
        n = next - at;
      }
      if (nbdkit_add_extent(extents, at, n, type) != 0) return -1;
      at += n;
      if (one) break;
    }
    return 0;
  });
}

}  // namespace

static struct nbdkit_plugin plugin = [] {
  struct nbdkit_plugin p {};
  p.name = "qcow2dedup";
  p.longname = "qcow2dedup: a deduplicating qcow2 image, written through inline dedup";
  p.version = "0.1.0";
  p.description = "Serves a qcow2dedup image; file=IMAGE [readonly=true] [unsafe=true]";
  p.config = Config;
  p.config_complete = ConfigComplete;
  p.config_help =
      "file=IMAGE       (required) the qcow2 image to serve\n"
      "readonly=BOOL    open the image read-only (QEMU's shared lock)\n"
      "unsafe=BOOL      never sync (as qemu-img -t unsafe)\n"
      "progress=BOOL    show the progress of a dedup index rebuild\n"
      "index_memory=SIZE  cap the dedup index's memory (past it, data is stored, not indexed)\n"
      "name=NAME        how messages name the image (default: its absolute path)\n"
      "uri=URI          print this URI on stderr once serving";
  p.magic_config_key = "file";
  p.get_ready = GetReady;
  p.after_fork = AfterFork;
  p.cleanup = Cleanup;
  p.open = Open;
  p.get_size = GetSize;
  p.block_size = BlockSize;
  p.can_write = CanWrite;
  p.can_flush = CanFlush;
  p.can_trim = CanTrim;
  p.can_zero = CanZero;
  p.can_fast_zero = CanFastZero;
  p.can_extents = CanExtents;
  p.can_fua = CanFua;
  p.can_multi_conn = CanMultiConn;
  p.can_cache = CanCache;
  p.pread = Pread;
  p.pwrite = Pwrite;
  p.zero = Zero;
  p.trim = Trim;
  p.flush = Flush;
  p.extents = Extents;
  return p;
}();

NBDKIT_REGISTER_PLUGIN(plugin)
