// convert: a pipeline that feeds the dedup write path. Chunks are read and
// hashed on worker threads while this thread writes earlier ones, in order.
#include "qcow2dedup/convert.h"

#include <fmt/format.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "dedup/hasher.h"
#include "dedup/sha256.h"
#include "image/chunk_compressor.h"

namespace qcow2dedup {
namespace {

constexpr uint64_t kChunkBytes = 4u << 20;

struct Chunk {
  uint64_t offset = 0;
  std::vector<uint8_t> data;
  std::vector<ClusterWrite> writes;
  std::vector<uint8_t> compressed;  // convert -c: the compressed clusters' bytes
  std::vector<uint8_t> base;        // convert -B: the base's bytes under data
  Status status;  // of filling it
};

// Fills a chunk's data (on a worker thread); the default leaves it as is.
using FillFn = std::function<Status(Chunk&)>;

// Fills and hashes chunks on a fixed pool of HashThreads() workers while the
// calling thread writes earlier ones, in order: one writer, so the write
// path needs no lock. Up to depth_ chunks are in flight, enough that a worker
// always finds a chunk to hash while the writer writes. Chunks are recycled:
// a fresh 4 MiB buffer each time costs page faults and zeroing.
class HashPipeline {
 public:
  // detect_zeros false: zero clusters are hashed and stored as data (-S 0).
  // compressor (convert -c): compresses new data on the workers too.
  explicit HashPipeline(Image& dst, bool detect_zeros = true, ChunkCompressor* compressor = nullptr)
      : dst_(dst), depth_(HashThreads() + 3), detect_zeros_(detect_zeros), compressor_(compressor) {
    for (unsigned i = 0; i < HashThreads(); ++i) workers_.emplace_back([this] { Work(); });
  }

  // A chunk for guest bytes [offset, offset + len), len a multiple of the
  // cluster size or the end of the input (the tail is zeroed).
  std::unique_ptr<Chunk> Take(uint64_t offset, uint64_t len) {
    std::unique_ptr<Chunk> c;
    if (free_.empty()) {
      c = std::make_unique<Chunk>();
    } else {
      c = std::move(free_.back());
      free_.pop_back();
    }
    c->offset = offset;
    c->writes.clear();
    Fit(*c, len);
    return c;
  }
  // Sizes the chunk to len rounded up to clusters, the padding zero.
  void Fit(Chunk& c, uint64_t len) {
    const uint64_t cs = dst_.cluster_size();
    c.data.resize((len + cs - 1) / cs * cs);
    std::memset(c.data.data() + len, 0, c.data.size() - len);
  }

  // Queues a chunk: fill (if given) and hashing run on a worker thread.
  Status Push(std::unique_ptr<Chunk> c, FillFn fill = nullptr) {
    const uint64_t cs = dst_.cluster_size();
    for (uint64_t i = 0; i < c->data.size() / cs; ++i)
      c->writes.push_back({c->offset / cs + i, std::span<const uint8_t>(&c->data[i * cs], cs), false, {}});
    c->status = Status::Ok();
    {
      std::lock_guard lock(mutex_);
      inflight_.push_back({std::move(c), std::move(fill), false});
      todo_.push_back(&inflight_.back());
    }
    work_ready_.notify_one();
    if (inflight_.size() >= depth_) return PopOne();
    return Status::Ok();
  }
  Status Drain() {
    while (!inflight_.empty()) QD_RETURN_IF_ERROR(PopOne());
    return Status::Ok();
  }
  ~HashPipeline() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
      todo_.clear();  // after an error: what is not begun is not needed
    }
    work_ready_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

 private:
  struct InFlight {
    std::unique_ptr<Chunk> chunk;
    FillFn fill;
    bool done;
  };
  void Work() {
    for (;;) {
      InFlight* f;
      {
        std::unique_lock lock(mutex_);
        work_ready_.wait(lock, [&] { return stop_ || !todo_.empty(); });
        if (stop_) return;
        f = todo_.front();
        todo_.pop_front();
      }
      Chunk& c = *f->chunk;
      if (f->fill) c.status = f->fill(c);
      if (c.status.ok())
        for (ClusterWrite& w : c.writes) {
          PrepareClusterWrite(w);
          if (w.zero && !detect_zeros_) {
            w.zero = false;
            w.digest = Sha256(w.data);
          }
        }
      if (c.status.ok() && compressor_) compressor_->Run(c.writes, c.compressed);
      {
        std::lock_guard lock(mutex_);
        f->done = true;
      }
      chunk_done_.notify_all();
    }
  }
  Status PopOne() {
    {
      std::unique_lock lock(mutex_);
      chunk_done_.wait(lock, [&] { return inflight_.front().done; });
    }
    // Only this thread adds or removes in-flight chunks (std::deque keeps
    // the others' addresses, which todo_ holds, when the front goes).
    std::unique_ptr<Chunk> c = std::move(inflight_.front().chunk);
    {
      std::lock_guard lock(mutex_);
      inflight_.pop_front();
    }
    Status s = c->status.ok() ? dst_.WriteClusters(c->writes) : c->status;
    free_.push_back(std::move(c));
    return s;
  }
  Image& dst_;
  const unsigned depth_;
  const bool detect_zeros_;
  ChunkCompressor* const compressor_;
  std::mutex mutex_;  // guards todo_, stop_, the done flags and inflight_'s shape
  std::condition_variable work_ready_, chunk_done_;
  std::deque<InFlight> inflight_;  // in push order, the oldest first
  std::deque<InFlight*> todo_;     // not yet taken by a worker
  bool stop_ = false;
  std::vector<std::unique_ptr<Chunk>> free_;
  std::vector<std::thread> workers_;
};

// Flushes dst after every `interval` bytes pushed (0: never). The pipeline
// is drained first, so that a flush covers every byte before it.
class FlushPoints {
 public:
  explicit FlushPoints(uint64_t interval) : interval_(interval) {}
  Status After(uint64_t bytes, HashPipeline& pipe, Image& dst) {
    pushed_ += bytes;
    if (interval_ == 0 || pushed_ < interval_) return Status::Ok();
    pushed_ = 0;
    QD_RETURN_IF_ERROR(pipe.Drain());
    return dst.Flush();
  }

 private:
  uint64_t interval_, pushed_ = 0;
};

// Makes guest clusters [pos, end) of dst read zero, writing only those that
// do not already (a target that is mostly zero costs next to nothing).
Status ZeroTarget(Image& dst, uint64_t pos, uint64_t end) {
  const uint64_t cs = dst.cluster_size();
  std::vector<uint8_t> zero_data;  // the write path wants a cluster of bytes even for a zero one
  std::vector<ClusterWrite> zeros;
  while (pos < end) {
    QD_ASSIGN_OR_RETURN(uint64_t run, dst.ZeroRun(pos));
    if (run >= cs) {
      pos = std::min(end, pos + run / cs * cs);
      continue;
    }
    if (zero_data.empty()) zero_data.resize(cs);
    zeros.push_back({pos / cs, std::span<const uint8_t>(zero_data), true, {}});
    pos += cs;
    if (zeros.size() >= 4096) {
      QD_RETURN_IF_ERROR(dst.WriteClusters(zeros));
      zeros.clear();
    }
  }
  if (!zeros.empty()) QD_RETURN_IF_ERROR(dst.WriteClusters(zeros));
  return Status::Ok();
}

// Writes len zero bytes at offset, in runs of at most 1 MiB (see DataWriter).
Status WriteZeros(File& dst, uint64_t offset, uint64_t len) {
  static const std::vector<uint8_t> kZeros(1u << 20);
  while (len > 0) {
    const uint64_t n = std::min<uint64_t>(len, kZeros.size());
    QD_RETURN_IF_ERROR(dst.WriteAt(offset, {kZeros.data(), n}));
    offset += n;
    len -= n;
  }
  return Status::Ok();
}

// convert -B: reads the base under chunk c (zeros past the base's end, as
// the overlay reads them) and drops the writes of clusters that read the
// same there, so that the base shows through. On a worker, before hashing:
// a cluster left to the base is never hashed.
Status DropSameAsBase(BlockDevice& base, std::mutex& base_mutex, Chunk& c, uint64_t cs) {
  const uint64_t bsize = base.virtual_size();
  c.base.resize(c.data.size());
  const uint64_t n = c.offset >= bsize ? 0 : std::min<uint64_t>(c.base.size(), bsize - c.offset);
  if (n) {
    std::lock_guard lock(base_mutex);
    QD_RETURN_IF_ERROR(base.Read(c.offset, std::span<uint8_t>(c.base.data(), n)));
  }
  std::memset(c.base.data() + n, 0, c.base.size() - n);
  std::erase_if(c.writes, [&](const ClusterWrite& w) {
    return std::memcmp(w.data.data(), &c.base[w.guest_cluster * cs - c.offset], cs) == 0;
  });
  return Status::Ok();
}

}  // namespace

Status CopyInto(BlockDevice& src, Image& dst, const ProgressFn& progress, const CopyOptions& options) {
  const bool detect_zeros = options.sparse_size != 0;
  const uint64_t cs = dst.cluster_size(), size = src.virtual_size();
  if (dst.virtual_size() < size) return Status::InvalidArgument("the target is smaller than the source");
  // Reads run on the workers, one at a time: a source need not be
  // thread-safe, and reading still overlaps hashing and writing.
  std::mutex src_mutex, base_mutex;
  BlockDevice* const base = options.base;
  auto compressor = options.compress ? MakeChunkCompressor(dst) : nullptr;
  HashPipeline pipe(dst, detect_zeros, compressor.get());
  FlushPoints flushes(options.flush_interval);
  uint64_t pos = 0;
  // convert -B: how far from pos the base reads zero (all the way past its end).
  auto base_zero_run = [&]() -> Result<uint64_t> {
    if (pos >= base->virtual_size()) return size - pos;
    std::lock_guard lock(base_mutex);
    return base->ZeroRun(pos);
  };
  while (pos < size) {
    // Holes are skipped without reading them; a fresh image already reads
    // zero there. (Only whole clusters: a partial one must still be written.)
    auto zero_run = [&] {
      std::lock_guard lock(src_mutex);
      return src.ZeroRun(pos);
    }();
    QD_ASSIGN_OR_RETURN(uint64_t zeros, std::move(zero_run));
    zeros = std::min(zeros, size - pos);
    if (detect_zeros && pos % cs == 0 && zeros >= cs && base) {
      // Over a base, a hole is left alone only where the base reads zero
      // too; elsewhere chunks are read and compared with the base, which
      // tells data from zeros that an allocated raw base only seems to hold.
      QD_ASSIGN_OR_RETURN(uint64_t base_zeros, base_zero_run());
      zeros = std::min(zeros, base_zeros);
    }
    if (detect_zeros && pos % cs == 0 && zeros >= cs) {
      // Writes of earlier chunks may still be queued: they are other clusters.
      if (options.target == TargetState::kAnyData) QD_RETURN_IF_ERROR(ZeroTarget(dst, pos, pos + zeros / cs * cs));
      pos += zeros / cs * cs;
      if (progress) progress(pos, size);
      continue;
    }
    const uint64_t start = pos / cs * cs;
    const uint64_t len = std::min<uint64_t>(kChunkBytes, size - start);
    // The kernel reads the next chunk ahead while workers read this one.
    {
      std::lock_guard lock(src_mutex);
      src.Prefetch(start + len, kChunkBytes);
    }
    if (base) {
      std::lock_guard lock(base_mutex);
      base->Prefetch(start + len, kChunkBytes);
    }
    auto c = pipe.Take(start, len);
    QD_RETURN_IF_ERROR(pipe.Push(std::move(c), [&, start, len](Chunk& chunk) {
      {
        std::lock_guard lock(src_mutex);
        QD_RETURN_IF_ERROR(src.Read(start, std::span<uint8_t>(chunk.data.data(), len)));
      }
      return base ? DropSameAsBase(*base, base_mutex, chunk, cs) : Status::Ok();
    }));
    pos = start + len;
    QD_RETURN_IF_ERROR(flushes.After(len, pipe, dst));
    if (progress) progress(pos, size);
  }
  return pipe.Drain();
}

Status StreamInto(const StreamReader& read, Image& dst, const ProgressFn& progress, uint64_t flush_interval,
                  bool compress) {
  auto compressor = compress ? MakeChunkCompressor(dst) : nullptr;
  HashPipeline pipe(dst, true, compressor.get());
  FlushPoints flushes(flush_interval);
  uint64_t total = 0;
  for (bool eof = false; !eof;) {
    auto c = pipe.Take(total, kChunkBytes);
    size_t got = 0;
    while (got < kChunkBytes) {
      QD_ASSIGN_OR_RETURN(size_t n, read(std::span<uint8_t>(c->data.data() + got, kChunkBytes - got)));
      if (n == 0) {
        eof = true;
        break;
      }
      got += n;
    }
    if (got == 0) break;
    pipe.Fit(*c, got);
    const uint64_t end = (total + got + 511) & ~511ull;
    if (end > dst.virtual_size()) {
      // Grow ahead of the data so the L1 table does not move at every chunk.
      QD_RETURN_IF_ERROR(pipe.Drain());
      QD_RETURN_IF_ERROR(dst.Resize(std::max(end, (total + got) * 2)));
    }
    total += got;
    QD_RETURN_IF_ERROR(pipe.Push(std::move(c)));
    QD_RETURN_IF_ERROR(flushes.After(got, pipe, dst));
    if (progress) progress(total, 0);
  }
  QD_RETURN_IF_ERROR(pipe.Drain());
  return dst.Resize((total + 511) & ~511ull);
}

namespace {

// What ExportRaw writes next: a run of zeros (reading it was skipped) or a
// chunk of data.
struct RawPiece {
  uint64_t zeros = 0, len = 0;
  std::vector<uint8_t> buf;
  Status status;
};

void LoadPiece(BlockDevice& src, uint64_t pos, RawPiece& p) {
  p.zeros = p.len = 0;
  auto zeros = src.ZeroRun(pos);
  p.status = zeros.status();
  if (!p.status.ok()) return;
  if (*zeros > 0) {
    p.zeros = std::min(*zeros, src.virtual_size() - pos);
    return;
  }
  p.len = std::min<uint64_t>(kChunkBytes, src.virtual_size() - pos);
  p.buf.resize(kChunkBytes);
  p.status = src.Read(pos, std::span<uint8_t>(p.buf.data(), p.len));
}

// Reads src from the start, a few pieces ahead of the writer, on a thread
// of its own (the only one that touches src). A handoff per piece would
// make the writer wait for that thread to be scheduled at every piece on a
// busy machine; a few pieces ahead, it rarely waits.
class ReadAhead {
 public:
  explicit ReadAhead(BlockDevice& src) {
    for (RawPiece& p : pieces_) free_.push_back(&p);
    reader_ = std::thread([this, &src] { Read(src); });
  }
  ~ReadAhead() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    reader_.join();
  }
  // The next piece in order (its status may be an error: then no more come).
  RawPiece* Next() {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return !ready_.empty(); });
    RawPiece* p = ready_.front();
    ready_.pop_front();
    return p;
  }
  void Done(RawPiece* p) {
    {
      std::lock_guard lock(mutex_);
      free_.push_back(p);
    }
    changed_.notify_all();
  }

 private:
  void Read(BlockDevice& src) {
    uint64_t asked = 0;  // src.Prefetch has been called up to here
    for (uint64_t pos = 0; pos < src.virtual_size();) {
      RawPiece* p;
      {
        std::unique_lock lock(mutex_);
        changed_.wait(lock, [&] { return stop_ || !free_.empty(); });
        if (stop_) return;
        p = free_.front();
        free_.pop_front();
      }
      // The disk reads this piece's clusters side by side, and the next
      // one's while this one is written.
      const uint64_t ahead = pos + 2 * kChunkBytes;
      if (asked < ahead) src.Prefetch(std::max(asked, pos), ahead - std::max(asked, pos));
      asked = std::max(asked, ahead);
      LoadPiece(src, pos, *p);
      pos += p->zeros + p->len;
      const bool failed = !p->status.ok();
      {
        std::lock_guard lock(mutex_);
        ready_.push_back(p);
      }
      changed_.notify_all();
      if (failed) return;
    }
  }

  RawPiece pieces_[4];
  std::mutex mutex_;  // guards the rest
  std::condition_variable changed_;
  std::deque<RawPiece*> ready_, free_;
  bool stop_ = false;
  std::thread reader_;
};

}  // namespace

Status ExportRaw(BlockDevice& src, File& dst, const ProgressFn& progress, const CopyOptions& options) {
  // Holes stand for zeros only in a target that reads zero, and only with -S.
  const bool holes = options.target == TargetState::kZero && options.sparse_size != 0;
  const uint64_t size = src.virtual_size();
  const uint64_t block = options.sparse_size ? options.sparse_size : 4096;
  ReadAhead ahead(src);
  for (uint64_t pos = 0; pos < size;) {
    RawPiece* cur = ahead.Next();
    QD_RETURN_IF_ERROR(cur->status);
    if (cur->zeros > 0) {
      // An unallocated run is a hole even when shorter than -S: it was one.
      if (options.target == TargetState::kAnyData || !options.sparse_size)
        QD_RETURN_IF_ERROR(WriteZeros(dst, pos, cur->zeros));
    } else {
      const std::vector<uint8_t>& buf = cur->buf;
      const uint64_t len = cur->len;
      // Write only the 4 KiB blocks that hold data: the rest stays a hole.
      for (uint64_t b = 0; b < len;) {
        uint64_t n = std::min(block, len - b);
        if (holes && IsAllZero({&buf[b], n})) {
          b += n;
          continue;
        }
        // Runs of at most 1 MiB: see DataWriter on large buffered writes.
        uint64_t e = b + n;
        while (e < len && e - b < (1u << 20) && !(holes && IsAllZero({&buf[e], std::min(block, len - e)})))
          e += std::min(block, len - e);
        QD_RETURN_IF_ERROR(dst.WriteAt(pos + b, {&buf[b], e - b}));
        b = e;
      }
    }
    pos += cur->zeros + cur->len;
    ahead.Done(cur);
    if (progress) progress(pos, size);
  }
  // Holes at the end: the file must still reach size. Never shrink: a
  // target of -n (a block device, a larger file) keeps its size.
  QD_ASSIGN_OR_RETURN(uint64_t file_size, dst.Size());
  if (file_size < size) QD_RETURN_IF_ERROR(dst.Truncate(size));
  return options.cache == CacheMode::kUnsafe ? Status::Ok() : dst.Sync();
}

}  // namespace qcow2dedup
