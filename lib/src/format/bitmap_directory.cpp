#include "format/bitmap_directory.h"

#include <fmt/format.h>

#include "format/endian.h"

namespace qcow2dedup {
namespace {

constexpr uint64_t kMaxDirectoryBytes = 64u << 20;  // QEMU's BM_MAX_DIRECTORY_SIZE
constexpr uint32_t kMaxBitmaps = 65535;             // QCOW2_MAX_BITMAPS
constexpr size_t kEntryBytes = 24;
constexpr uint32_t kMaxNameBytes = 1023;            // BME_MAX_NAME_SIZE
constexpr uint8_t kMinGranularityBits = 9, kMaxGranularityBits = 31;
constexpr uint8_t kTypeDirtyTracking = 1;
constexpr uint32_t kKnownFlags = kBitmapInUse | kBitmapAuto | kBitmapExtraDataCompatible;

Status Corrupt(const std::string& what) { return Status::Corruption(fmt::format("bitmap directory: {}", what)); }

}  // namespace

Result<BitmapExtension> DecodeBitmapExtension(std::span<const uint8_t> ext) {
  if (ext.size() < 24) return Corrupt(fmt::format("its header extension has {} bytes, not 24", ext.size()));
  BitmapExtension e;
  e.nb_bitmaps = uint32_t(LoadBe64(ext.data()) >> 32);
  if (LoadBe64(ext.data()) & 0xffffffffu) return Corrupt("reserved bytes of its header extension are not zero");
  e.directory_size = LoadBe64(ext.data() + 8);
  e.directory_offset = LoadBe64(ext.data() + 16);
  if (e.nb_bitmaps > kMaxBitmaps) return Corrupt(fmt::format("{} bitmaps, more than {}", e.nb_bitmaps, kMaxBitmaps));
  if (e.directory_size > kMaxDirectoryBytes)
    return Corrupt(fmt::format("{} bytes, more than {}", e.directory_size, kMaxDirectoryBytes));
  return e;
}

Result<std::vector<BitmapEntry>> DecodeBitmapDirectory(std::span<const uint8_t> dir, uint32_t nb_bitmaps) {
  std::vector<BitmapEntry> entries;
  size_t pos = 0;
  for (uint32_t b = 0; b < nb_bitmaps; ++b) {
    if (dir.size() - pos < kEntryBytes) return Corrupt(fmt::format("entry {} is cut off", b));
    const uint8_t* p = dir.data() + pos;
    BitmapEntry e;
    e.table_offset = LoadBe64(p);
    e.table_size = uint32_t(LoadBe64(p + 8) >> 32);
    e.flags = uint32_t(LoadBe64(p + 8));
    e.type = p[16];
    e.granularity_bits = p[17];
    const uint32_t name_size = uint32_t(p[18]) << 8 | p[19];
    const uint32_t extra = uint32_t(LoadBe64(p + 16));
    const uint64_t size = (uint64_t(kEntryBytes) + extra + name_size + 7) & ~uint64_t(7);
    if (size > dir.size() - pos) return Corrupt(fmt::format("entry {} is cut off", b));
    if (name_size == 0 || name_size > kMaxNameBytes)
      return Corrupt(fmt::format("entry {} has a name of {} bytes", b, name_size));
    if (e.type != kTypeDirtyTracking) return Corrupt(fmt::format("entry {} has type {}", b, e.type));
    if (e.granularity_bits < kMinGranularityBits || e.granularity_bits > kMaxGranularityBits)
      return Corrupt(fmt::format("entry {} has a granularity of 2^{}", b, e.granularity_bits));
    if (e.flags & ~kKnownFlags) return Corrupt(fmt::format("entry {} has unknown flags {:#x}", b, e.flags));
    if (extra != 0 && !(e.flags & kBitmapExtraDataCompatible))
      return Corrupt(fmt::format("entry {} has extra data QEMU would not know", b));
    e.name.assign(reinterpret_cast<const char*>(p + kEntryBytes + extra), name_size);
    entries.push_back(std::move(e));
    pos += size;
  }
  return entries;
}

Result<std::vector<BitmapEntry>> ReadBitmapDirectory(File& file, const Header& h, uint64_t file_size) {
  if (!(h.autoclear & kAutoclearBitmaps)) return std::vector<BitmapEntry>{};
  const std::vector<uint8_t>* raw = nullptr;
  for (const auto& [type, data] : h.other_extensions)
    if (type == kExtBitmaps) raw = &data;
  if (!raw) return std::vector<BitmapEntry>{};
  QD_ASSIGN_OR_RETURN(BitmapExtension ext, DecodeBitmapExtension(*raw));
  if (ext.nb_bitmaps == 0) return std::vector<BitmapEntry>{};
  if (ext.directory_offset > file_size || ext.directory_size > file_size - ext.directory_offset)
    return Corrupt(fmt::format("{} bytes at {:#x} lie beyond the end of the file", ext.directory_size,
                               ext.directory_offset));
  if (ext.directory_offset % h.cluster_size())
    return Corrupt(fmt::format("its offset {:#x} is not cluster-aligned", ext.directory_offset));
  std::vector<uint8_t> dir(ext.directory_size);
  QD_RETURN_IF_ERROR(file.ReadAt(ext.directory_offset, dir));
  return DecodeBitmapDirectory(dir, ext.nb_bitmaps);
}

}  // namespace qcow2dedup
