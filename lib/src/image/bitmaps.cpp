// Image::Bitmaps: the bitmap directory, for info (qemu-img info's "bitmaps").
#include "format/bitmap_directory.h"
#include "image/image_state.h"

namespace qcow2dedup {

Result<std::vector<BitmapInfo>> Image::Bitmaps() const {
  const ImageState& s = *state_;
  QD_ASSIGN_OR_RETURN(auto entries, ReadBitmapDirectory(*s.file, s.header, s.file_size));
  std::vector<BitmapInfo> out;
  for (const BitmapEntry& e : entries)
    out.push_back({e.name, e.granularity(), (e.flags & kBitmapInUse) != 0, (e.flags & kBitmapAuto) != 0});
  return out;
}

}  // namespace qcow2dedup
