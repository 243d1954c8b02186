// Persistent bitmaps with their bits, out of one image and into another
// (convert --bitmaps, as qemu-img convert --bitmaps: same names,
// granularities, enabled state and dirty bits). The layout is QEMU's
// (docs/interop/qcow2.rst, "Bitmaps"): a directory of entries, each with a
// table of 8-byte entries, each naming a cluster of bits (0: all zero,
// 1: all one).
#include <fmt/format.h>

#include <algorithm>

#include "format/bitmap_directory.h"
#include "format/endian.h"
#include "image/image_state.h"
#include "image/writer.h"

namespace qcow2dedup {
namespace {

constexpr uint64_t kTableOffsetMask = 0x00fffffffffffe00ull;
constexpr uint8_t kTypeDirtyTracking = 1;

uint64_t BitmapBytes(uint64_t virtual_size, uint64_t granularity) {
  return ((virtual_size + granularity - 1) / granularity + 7) / 8;
}

}  // namespace

Result<std::vector<PersistentBitmap>> Image::ReadBitmaps() const {
  const ImageState& s = *state_;
  QD_ASSIGN_OR_RETURN(auto entries, ReadBitmapDirectory(*s.file, s.header, s.file_size));
  const uint64_t cs = s.cs();
  std::vector<PersistentBitmap> out;
  for (const BitmapEntry& e : entries) {
    if (e.flags & kBitmapInUse)
      return Status::Corruption(fmt::format("bitmap '{}' is inconsistent and cannot be used", e.name));
    PersistentBitmap b;
    b.info = {e.name, e.granularity(), false, (e.flags & kBitmapAuto) != 0};
    b.bits.assign(BitmapBytes(s.header.virtual_size, e.granularity()), 0);
    if (b.bits.size() > uint64_t(e.table_size) * cs)
      return Status::Corruption(fmt::format("bitmap '{}': its table is too short for the image", e.name));
    std::vector<uint8_t> table(uint64_t(e.table_size) * 8);
    QD_RETURN_IF_ERROR(s.file->ReadAt(e.table_offset, table));
    std::vector<uint8_t> data(cs);
    for (uint64_t j = 0; j * cs < b.bits.size(); ++j) {
      const uint64_t te = LoadBe64(&table[j * 8]), off = te & kTableOffsetMask;
      const uint64_t n = std::min<uint64_t>(cs, b.bits.size() - j * cs);
      if (te == 1) {
        std::fill_n(b.bits.begin() + j * cs, n, 0xff);
      } else if (off) {
        if (off % cs || off + cs > s.file_size)
          return Status::Corruption(fmt::format("bitmap '{}': data cluster {:#x} lies outside the image", e.name, off));
        QD_RETURN_IF_ERROR(s.file->ReadAt(off, data));
        std::copy_n(data.begin(), n, b.bits.begin() + j * cs);
      }
    }
    // Bits past the image's end are not the guest's.
    const uint64_t nbits = (s.header.virtual_size + e.granularity() - 1) / e.granularity();
    if (nbits % 8) b.bits.back() &= uint8_t((1u << (nbits % 8)) - 1);
    out.push_back(std::move(b));
  }
  return out;
}

Status Image::AddBitmaps(const std::vector<PersistentBitmap>& bitmaps) {
  if (!state_->writer) return Status::InvalidArgument("the image is open read-only");
  return state_->writer->AddBitmaps(bitmaps);
}

Status Writer::AddBitmaps(const std::vector<PersistentBitmap>& bitmaps) {
  if (bitmaps.empty()) return Status::Ok();
  if (v2_) return Status::Unsupported("version 2 images cannot hold persistent bitmaps");
  QD_ASSIGN_OR_RETURN(auto existing, ReadBitmapDirectory(*s_.file, s_.header, s_.file_size));
  if (!existing.empty()) return Status::Unsupported("the image has persistent bitmaps already");
  const uint64_t cs = s_.cs();
  // Clusters come from the allocator, so the flush at Close writes their
  // refcounts; the header that points at the directory is written last.
  auto allocate = [&](uint64_t bytes) -> Result<uint64_t> {
    const uint64_t n = (bytes + cs - 1) / cs;
    QD_ASSIGN_OR_RETURN(uint64_t at, n == 1 ? refcounts_->Allocate() : refcounts_->AllocateRange(n));
    for (uint64_t i = 0; i < n; ++i) {
      QD_RETURN_IF_ERROR(s_.meta.CheckTableWrite(at + i * cs));
      s_.meta.AddTable(at + i * cs);
    }
    s_.map->NoteFileEnd(at + n * cs);
    return at;
  };
  return Guarded([&] {
    QD_RETURN_IF_ERROR(BeginChange());
    std::vector<uint8_t> dir;
    for (const PersistentBitmap& b : bitmaps) {
      const uint64_t g = b.info.granularity;
      if (g < 512 || g > (uint64_t(1) << 31) || (g & (g - 1)))
        return Status::InvalidArgument(fmt::format("bitmap '{}' has a granularity of {}", b.info.name, g));
      if (b.info.name.empty() || b.info.name.size() > 1023)
        return Status::InvalidArgument("a bitmap name must have 1 to 1023 bytes");
      if (b.bits.size() != BitmapBytes(s_.header.virtual_size, g))
        return Status::InvalidArgument(fmt::format("bitmap '{}' does not fit the image's size", b.info.name));
      const uint64_t table_size = (b.bits.size() + cs - 1) / cs;
      std::vector<uint8_t> table(table_size * 8, 0);
      std::vector<uint8_t> data(cs);
      for (uint64_t j = 0; j < table_size; ++j) {
        const uint64_t n = std::min<uint64_t>(cs, b.bits.size() - j * cs);
        const auto first = b.bits.begin() + j * cs;
        if (std::all_of(first, first + n, [](uint8_t x) { return x == 0; })) continue;
        std::fill(data.begin(), data.end(), 0);
        std::copy_n(first, n, data.begin());
        QD_ASSIGN_OR_RETURN(uint64_t at, allocate(cs));
        QD_RETURN_IF_ERROR(s_.file->WriteAt(at, data));
        StoreBe64(&table[j * 8], at);
      }
      QD_ASSIGN_OR_RETURN(uint64_t table_at, allocate(table.size()));
      table.resize((table.size() + cs - 1) / cs * cs, 0);
      QD_RETURN_IF_ERROR(s_.file->WriteAt(table_at, table));
      const size_t at = dir.size();
      dir.resize(at + ((24 + b.info.name.size() + 7) & ~size_t(7)), 0);
      uint8_t* p = &dir[at];
      StoreBe64(p, table_at);
      StoreBe64(p + 8, table_size << 32 | (b.info.auto_enabled ? kBitmapAuto : 0));
      p[16] = kTypeDirtyTracking;
      p[17] = uint8_t(__builtin_ctzll(g));
      p[18] = uint8_t(b.info.name.size() >> 8);
      p[19] = uint8_t(b.info.name.size());
      std::copy(b.info.name.begin(), b.info.name.end(), p + 24);
    }
    QD_ASSIGN_OR_RETURN(uint64_t dir_at, allocate(dir.size()));
    std::vector<uint8_t> dir_clusters(dir);
    dir_clusters.resize((dir.size() + cs - 1) / cs * cs, 0);
    QD_RETURN_IF_ERROR(s_.file->WriteAt(dir_at, dir_clusters));
    std::vector<uint8_t> ext(24, 0);
    StoreBe64(ext.data(), uint64_t(bitmaps.size()) << 32);
    StoreBe64(ext.data() + 8, dir.size());
    StoreBe64(ext.data() + 16, dir_at);
    // A bitmaps extension without the autoclear bit is one QEMU ignores: ours replaces it.
    std::erase_if(s_.header.other_extensions, [](const auto& e) { return e.first == kExtBitmaps; });
    s_.header.other_extensions.emplace_back(kExtBitmaps, ext);
    s_.header.autoclear |= kAutoclearBitmaps;
    header_changed_ = true;
    return Status::Ok();
  });
}

}  // namespace qcow2dedup
