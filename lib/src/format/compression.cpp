#include "format/compression.h"

#include <zlib.h>
#include <zstd.h>

namespace qcow2dedup {
namespace {

Status Inflate(std::span<const uint8_t> in, std::span<uint8_t> out) {
  z_stream z = {};
  if (inflateInit2(&z, -12) != Z_OK) return Status::IOError("zlib initialisation failed");
  z.next_in = const_cast<uint8_t*>(in.data());
  z.avail_in = uInt(in.size());
  z.next_out = out.data();
  z.avail_out = uInt(out.size());
  int r = inflate(&z, Z_FINISH);
  bool full = z.avail_out == 0;
  inflateEnd(&z);
  // QEMU accepts Z_BUF_ERROR when the output is full: the input has padding.
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR) && full) return Status::Ok();
  return Status::Corruption("compressed cluster does not inflate to a whole cluster");
}

Status Unzstd(std::span<const uint8_t> in, std::span<uint8_t> out) {
  ZSTD_DCtx* ctx = ZSTD_createDCtx();
  if (!ctx) return Status::IOError("zstd initialisation failed");
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  // Streaming, because the input may run past the end of the frame.
  while (ob.pos < ob.size) {
    size_t r = ZSTD_decompressStream(ctx, &ob, &ib);
    if (ZSTD_isError(r)) {
      ZSTD_freeDCtx(ctx);
      return Status::Corruption(std::string("compressed cluster is not valid zstd: ") + ZSTD_getErrorName(r));
    }
    if (r == 0 || ib.pos == ib.size) break;
  }
  ZSTD_freeDCtx(ctx);
  if (ob.pos != ob.size) return Status::Corruption("compressed cluster does not decompress to a whole cluster");
  return Status::Ok();
}

// One deflate stream per thread, reset for each cluster: initialising one
// costs more than compressing a 4 KiB cluster.
struct Deflater {
  z_stream z = {};
  bool ok = false;
  Deflater() { ok = deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) == Z_OK; }
  ~Deflater() {
    if (ok) deflateEnd(&z);
  }
};

size_t Deflate(std::span<const uint8_t> in, std::span<uint8_t> out) {
  thread_local Deflater d;
  if (!d.ok || deflateReset(&d.z) != Z_OK) return 0;
  d.z.next_in = const_cast<uint8_t*>(in.data());
  d.z.avail_in = uInt(in.size());
  d.z.next_out = out.data();
  d.z.avail_out = uInt(out.size());
  // Z_OK here means the output filled up before the stream ended.
  if (deflate(&d.z, Z_FINISH) != Z_STREAM_END) return 0;
  return out.size() - d.z.avail_out;
}

struct ZstdCompressor {
  ZSTD_CCtx* ctx = ZSTD_createCCtx();
  ~ZstdCompressor() { ZSTD_freeCCtx(ctx); }
};

size_t Zstd(std::span<const uint8_t> in, std::span<uint8_t> out) {
  thread_local ZstdCompressor c;
  if (!c.ctx || ZSTD_isError(ZSTD_CCtx_reset(c.ctx, ZSTD_reset_session_only))) return 0;
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  // As QEMU: one frame, streamed to its end; a full output means no room.
  for (;;) {
    size_t r = ZSTD_compressStream2(c.ctx, &ob, &ib, ZSTD_e_end);
    if (ZSTD_isError(r)) return 0;
    if (r == 0) return ob.pos;
    if (ob.pos == ob.size) return 0;
  }
}

}  // namespace

size_t Compress(CompressionType type, std::span<const uint8_t> in, std::span<uint8_t> out) {
  return type == CompressionType::kZstd ? Zstd(in, out) : Deflate(in, out);
}

Status Decompress(CompressionType type, std::span<const uint8_t> in, std::span<uint8_t> out) {
  return type == CompressionType::kZstd ? Unzstd(in, out) : Inflate(in, out);
}

}  // namespace qcow2dedup
