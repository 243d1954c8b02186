// convert's two directions: any readable image into a dedup image (through
// the same write path as Image::Write, with hashing on every core), and any
// readable image out to a sparse raw file.
#pragma once

#include <functional>

#include "qcow2dedup/image.h"

#pragma GCC visibility push(default)  // the public API: exported from the shared library

namespace qcow2dedup {

// Copies the guest view of src into dst (dst.virtual_size() >= src's).
// flush_interval > 0: dst.Flush() after every flush_interval bytes of data
// copied, so that a crash keeps what was flushed; 0: flush only when dst's
// table cache is full (and the caller's Close at the end).
Status CopyInto(BlockDevice& src, Image& dst, const ProgressFn& progress = {}, uint64_t flush_interval = 0);

// Reads up to buf.size() bytes; returns 0 at the end of the stream.
using StreamReader = std::function<Result<size_t>(std::span<uint8_t> buf)>;

// Streams a source of unknown length (standard input) into dst, which
// grows as data arrives; its final virtual size is the length read,
// rounded up to 512 bytes. progress gets (bytes read, 0). flush_interval
// as for CopyInto.
Status StreamInto(const StreamReader& read, Image& dst, const ProgressFn& progress = {},
                  uint64_t flush_interval = 0);

// Writes src's guest view to dst as a raw file: zero runs become holes.
Status ExportRaw(BlockDevice& src, File& dst, const ProgressFn& progress = {});

}  // namespace qcow2dedup

#pragma GCC visibility pop
