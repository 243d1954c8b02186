// Persistent dirty bitmaps (qemu-img bitmap): their directory, tables and
// data clusters are referenced too, as QEMU's qcow2_check_bitmaps_refcounts()
// counts them. Without the autoclear bit QEMU treats them as gone, and so
// do we: their clusters are then leaks.
#include <fmt/format.h>

#include "check/references.h"
#include "format/endian.h"

namespace qcow2dedup::check {
namespace {

constexpr uint64_t kMaxBitmapDirectory = 64u << 20;  // QEMU's BM_MAX_DIRECTORY_SIZE
constexpr uint64_t kBitmapEntryOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kBitmapEntryReserved = 0xff000000000001feull;
constexpr size_t kDirEntryBytes = 24;

}  // namespace

Status Recount::CountBitmaps() {
  const Header& h = ctx_.header;
  if (!(h.autoclear & kAutoclearBitmaps)) return Status::Ok();
  const std::vector<uint8_t>* ext = nullptr;
  for (const auto& [type, data] : h.other_extensions)
    if (type == kExtBitmaps) ext = &data;
  if (!ext || ext->size() < 24) return Status::Ok();
  const uint32_t nb = uint32_t(LoadBe64(ext->data()) >> 32);
  const uint64_t dir_size = LoadBe64(ext->data() + 8), dir_offset = LoadBe64(ext->data() + 16);
  if (nb == 0) return Status::Ok();

  Inc(dir_offset, dir_size);
  MarkMeta(dir_offset, dir_size, "the bitmap directory");
  // A broken directory is where QEMU stops (it refuses to open the image),
  // and so does check: there is nothing to count.
  if (dir_size > kMaxBitmapDirectory || dir_offset > ctx_.file_size || dir_size > ctx_.file_size - dir_offset)
    return Status::Corruption("the bitmap directory lies outside the image");
  std::vector<uint8_t> dir(dir_size);
  QD_RETURN_IF_ERROR(ctx_.Read(dir_offset, dir));
  const uint64_t cs = ctx_.cs();
  // Valid bitmap tables lie side by side in the file: more than the file
  // holds means they overlap, and reading them again and again is what a
  // hostile directory would want.
  uint64_t budget = ctx_.file_size;
  size_t pos = 0;
  for (uint32_t b = 0; b < nb; ++b) {
    if (pos + kDirEntryBytes > dir.size()) return Status::Corruption("the bitmap directory is truncated");
    const uint8_t* p = &dir[pos];
    const uint64_t table_offset = LoadBe64(p);
    const uint32_t table_size = uint32_t(LoadBe64(p + 8) >> 32);
    const uint16_t name_size = uint16_t((p[18] << 8) | p[19]);
    const uint32_t extra = uint32_t(LoadBe64(p + 16) & 0xffffffffu);
    pos += (kDirEntryBytes + extra + name_size + 7) & ~size_t(7);

    const uint64_t table_bytes = uint64_t(table_size) * 8;
    Inc(table_offset, table_bytes);
    MarkMeta(table_offset, table_bytes, "a bitmap table");
    if (table_offset % cs || table_offset > ctx_.file_size || table_bytes > ctx_.file_size - table_offset)
      return Status::Corruption(fmt::format("bitmap table at {:#x} lies outside the image", table_offset));
    if (table_bytes > budget) {
      ++r_.check_errors;
      Note(r_, FindingArea::kBitmaps, FindingKind::kError,
           fmt::format("ERROR bitmap tables overlap beyond what the file can hold; the one at {:#x} is not checked",
                       table_offset));
      continue;
    }
    budget -= table_bytes;
    std::vector<uint8_t> table(table_bytes);
    QD_RETURN_IF_ERROR(ctx_.Read(table_offset, table));
    for (uint32_t i = 0; i < table_size; ++i) {
      const uint64_t e = LoadBe64(&table[uint64_t(i) * 8]);
      const uint64_t offset = e & kBitmapEntryOffsetMask;
      if ((e & kBitmapEntryReserved) || offset % cs || (offset && (e & 1))) {
        ++r_.corruptions;
        Note(r_, FindingArea::kBitmaps, FindingKind::kError,
             fmt::format("ERROR bitmap table entry {:#x} is corrupted", e));
        continue;
      }
      if (!offset) continue;
      Inc(offset, cs);
      MarkMeta(offset, cs, "bitmap data");
    }
  }
  return Status::Ok();
}

}  // namespace qcow2dedup::check
