// Persistent dirty bitmaps kept true while we write: every guest cluster a
// write session writes is marked dirty in every enabled (auto) bitmap, so
// that an incremental backup sees our writes. QEMU's own protocol, which
// makes a bitmap never silently stale: before the first change each
// enabled bitmap is flagged in-use on disk (inconsistent: QEMU then
// refuses to use it for a backup); at a clean close its data is brought up
// to date and only then is the flag cleared. A crash in between leaves the
// bitmap in-use, as a crash of QEMU leaves it.
//
// Only guest-visible writes mark: dedup's relinking changes no guest data
// (as QEMU's backup semantics count only what the guest sees), so an image
// that is only deduplicated has its bitmaps unchanged.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "image/refcounts.h"

namespace qcow2dedup {

class ImageState;

class BitmapMarks {
 public:
  // The enabled, consistent bitmaps of s (none without the bitmaps
  // autoclear bit); their clusters join the metadata map.
  static Result<std::unique_ptr<BitmapMarks>> Load(ImageState& s);

  bool empty() const { return bitmaps_.empty(); }
  // Flags them in-use on disk (the caller syncs before any change).
  Status MarkInUse();
  // Guest bytes [offset, offset + len) are being written.
  void Note(uint64_t offset, uint64_t len);
  // Sets the bits of every written cluster in every bitmap's data (new
  // data clusters come from refcounts; the caller's flush writes their
  // refcounts), in place: the in-use flag covers this.
  Status WriteMarks(Refcounts& refcounts);
  // After the caller synced the marks and refcounts: the bitmaps are
  // consistent again.
  Status ClearInUse();

 private:
  struct Bitmap {
    size_t flags_at;  // byte of the flags field in the directory
    uint64_t table_offset;
    uint32_t table_size;
    uint8_t granularity_bits;
  };
  explicit BitmapMarks(ImageState& s) : s_(s) {}
  Status WriteFlags(uint32_t set, uint32_t clear);

  ImageState& s_;
  uint64_t directory_offset_ = 0;
  std::vector<uint8_t> directory_;
  std::vector<Bitmap> bitmaps_;
  std::map<uint64_t, uint64_t> written_;  // start -> end of disjoint, non-adjacent ranges
  bool in_use_ = false;
};

}  // namespace qcow2dedup
