// Persistent dirty bitmaps (qemu-img bitmap --add): the bitmaps header
// extension (0x23852875) and the bitmap directory it points at, as
// docs/interop/qcow2.rst in QEMU lays them out. Only the directory: the
// bitmap tables and their data are QEMU's business (check counts them).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "format/header.h"
#include "qcow2dedup/file.h"

namespace qcow2dedup {

// Directory entry flags.
constexpr uint32_t kBitmapInUse = 1u << 0;  // being changed by a QEMU that has not stopped cleanly
constexpr uint32_t kBitmapAuto = 1u << 1;   // QEMU keeps it enabled (tracks writes)
constexpr uint32_t kBitmapExtraDataCompatible = 1u << 2;

struct BitmapEntry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries of 8 bytes
  uint32_t flags = 0;
  uint8_t type = 0;  // 1: dirty tracking, the only type defined
  uint8_t granularity_bits = 0;
  std::string name;
  uint64_t granularity() const { return uint64_t(1) << granularity_bits; }
};

// The bitmaps extension's fields.
struct BitmapExtension {
  uint32_t nb_bitmaps = 0;
  uint64_t directory_size = 0;
  uint64_t directory_offset = 0;
};

Result<BitmapExtension> DecodeBitmapExtension(std::span<const uint8_t> ext);

// Decodes nb_bitmaps entries of a directory; each entry's bounds and fields
// are checked as QEMU's check_dir_entry checks them.
Result<std::vector<BitmapEntry>> DecodeBitmapDirectory(std::span<const uint8_t> dir, uint32_t nb_bitmaps);

// The image's bitmaps, in directory order. None when the header has no
// bitmaps extension or lacks the bitmaps autoclear bit (a program that
// does not know bitmaps wrote the image: QEMU then ignores them, as do we).
Result<std::vector<BitmapEntry>> ReadBitmapDirectory(File& file, const Header& h, uint64_t file_size);

}  // namespace qcow2dedup
