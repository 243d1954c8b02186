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

}  // namespace

Status Decompress(CompressionType type, std::span<const uint8_t> in, std::span<uint8_t> out) {
  return type == CompressionType::kZstd ? Unzstd(in, out) : Inflate(in, out);
}

}  // namespace qcow2dedup
