// convert's two directions: any readable image into a dedup image (through
// the same write path as Image::Write, with hashing on every core), and any
// readable image out to a sparse raw file.
#pragma once

#include <functional>

#include "qcow2dedup/image.h"

#pragma GCC visibility push(default)  // the public API: exported from the shared library

namespace qcow2dedup {

// What a target holds before a copy: kZero (made for it, or known to read
// zero, as qemu-img's --target-is-zero), so holes are skipped; kAnyData (an
// existing target, qemu-img convert -n), so holes are written as zeros too.
enum class TargetState { kZero, kAnyData };

struct CopyOptions {
  TargetState target = TargetState::kZero;
  // qemu-img convert -S. 0: zeros are written as data, nothing is left
  // unallocated (in a dedup image every zero cluster then shares one stored
  // zero cluster). Otherwise raw output turns each aligned block of this
  // many zero bytes into a hole (a multiple of 512); qcow2 output detects
  // zeros a cluster at a time whatever the size.
  uint64_t sparse_size = 4096;
  // > 0: dst.Flush() after every flush_interval bytes of data copied, so
  // that a crash keeps what was flushed; 0: flush only when dst's table
  // cache is full (and the caller's Close at the end).
  uint64_t flush_interval = 0;
  // ExportRaw: kWriteback syncs dst at the end, kUnsafe does not. (A qcow2
  // dst has its own, from OpenOptions.)
  CacheMode cache = CacheMode::kWriteback;
  // qemu-img convert -c: data stored anew is stored compressed (dst's
  // compression type) where that saves a sector; only distinct data is
  // compressed, on the worker threads.
  bool compress = false;
  // convert -B: dst's backing file (qemu-img's -B BASE), opened apart from
  // dst so that the workers read it while dst is written. Each guest
  // cluster of src that reads the same as base at the same offset is not
  // written (the base shows through); a zero one where base holds data
  // gets the zero flag; the rest takes the dedup write path as ever. dst
  // must be fresh, with base as its backing file (target kZero).
  BlockDevice* base = nullptr;
};

// Copies the guest view of src into dst (dst.virtual_size() >= src's).
// With options.base, only what differs from the base.
// Guest bytes of dst past src's end stay as they were, but for the rest of
// src's last cluster when src's size is not a multiple of the cluster size.
Status CopyInto(BlockDevice& src, Image& dst, const ProgressFn& progress = {}, const CopyOptions& options = {});

// Reads up to buf.size() bytes; returns 0 at the end of the stream.
using StreamReader = std::function<Result<size_t>(std::span<uint8_t> buf)>;

// Streams a source of unknown length (standard input) into dst, which
// grows as data arrives; its final virtual size is the length read,
// rounded up to 512 bytes. progress gets (bytes read, 0). flush_interval
// and compress as in CopyOptions.
Status StreamInto(const StreamReader& read, Image& dst, const ProgressFn& progress = {},
                  uint64_t flush_interval = 0, bool compress = false);

// Writes src's guest view to dst as a raw file. kZero: dst reads zero (new,
// empty, or --target-is-zero); zero runs become holes. kAnyData: dst exists
// (a block device, a preallocated file); zeros are written as zeros. A dst
// shorter than src is extended to src's size; a longer one keeps its size.
Status ExportRaw(BlockDevice& src, File& dst, const ProgressFn& progress = {}, const CopyOptions& options = {});

}  // namespace qcow2dedup

#pragma GCC visibility pop
