#include "image/bitmap_marks.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>

#include "format/bitmap_directory.h"
#include "format/endian.h"
#include "image/image_state.h"

namespace qcow2dedup {
namespace {

constexpr size_t kEntryBytes = 24;
constexpr uint64_t kTableOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kTableAllOnes = 1;

}  // namespace

Result<std::unique_ptr<BitmapMarks>> BitmapMarks::Load(ImageState& s) {
  std::unique_ptr<BitmapMarks> m(new BitmapMarks(s));
  // The decoder vets every entry as QEMU does; the walk below then only
  // finds where each entry's flags lie.
  QD_ASSIGN_OR_RETURN(std::vector<BitmapEntry> entries, ReadBitmapDirectory(*s.file, s.header, s.file_size));
  if (entries.empty()) return m;
  const std::vector<uint8_t>* raw = nullptr;
  for (const auto& [type, data] : s.header.other_extensions)
    if (type == kExtBitmaps) raw = &data;
  QD_ASSIGN_OR_RETURN(BitmapExtension ext, DecodeBitmapExtension(*raw));
  m->directory_offset_ = ext.directory_offset;
  m->directory_.resize(ext.directory_size);
  QD_RETURN_IF_ERROR(s.file->ReadAt(ext.directory_offset, m->directory_));
  const uint64_t cs = s.cs();
  for (uint64_t c = 0; c < (ext.directory_size + cs - 1) / cs; ++c) s.meta.AddTable(ext.directory_offset + c * cs);
  size_t pos = 0;
  for (const BitmapEntry& e : entries) {
    const uint8_t* p = &m->directory_[pos];
    const uint32_t extra = uint32_t(LoadBe64(p + 16));
    const size_t at = pos;
    pos += (kEntryBytes + extra + e.name.size() + 7) & ~size_t(7);
    const uint64_t bits = (s.header.virtual_size + e.granularity() - 1) / e.granularity();
    const uint64_t need = (bits + cs * 8 - 1) / (cs * 8);
    if (e.table_size < need)
      return Status::Corruption(fmt::format("bitmap '{}': its table has {} entries, the image needs {}", e.name,
                                            e.table_size, need));
    for (uint64_t c = 0; c < (uint64_t(e.table_size) * 8 + cs - 1) / cs; ++c) s.meta.AddTable(e.table_offset + c * cs);
    std::vector<uint8_t> table(uint64_t(e.table_size) * 8);
    QD_RETURN_IF_ERROR(s.file->ReadAt(e.table_offset, table));
    for (uint32_t i = 0; i < e.table_size; ++i)
      if (uint64_t off = LoadBe64(&table[i * 8ull]) & kTableOffsetMask) s.meta.AddTable(off);
    // A disabled bitmap does not track writes; one already in use is
    // inconsistent already (QEMU will only let it be removed).
    if (!(e.flags & kBitmapAuto) || (e.flags & kBitmapInUse)) continue;
    m->bitmaps_.push_back({at + 8 + 4, e.table_offset, e.table_size, e.granularity_bits});
  }
  return m;
}

void BitmapMarks::Note(uint64_t offset, uint64_t len) {
  if (bitmaps_.empty() || len == 0) return;
  uint64_t start = offset, end = offset + len;
  auto it = written_.upper_bound(start);
  if (it != written_.begin() && std::prev(it)->second >= start) --it;
  while (it != written_.end() && it->first <= end) {
    start = std::min(start, it->first);
    end = std::max(end, it->second);
    it = written_.erase(it);
  }
  written_.emplace(start, end);
}

Status BitmapMarks::WriteFlags(uint32_t set, uint32_t clear) {
  for (const Bitmap& b : bitmaps_) {
    uint8_t* p = &directory_[b.flags_at];
    const uint32_t flags = ((uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]) | set) & ~clear;
    p[0] = uint8_t(flags >> 24), p[1] = uint8_t(flags >> 16), p[2] = uint8_t(flags >> 8), p[3] = uint8_t(flags);
  }
  return s_.file->WriteAt(directory_offset_, directory_);
}

Status BitmapMarks::MarkInUse() {
  if (bitmaps_.empty() || in_use_) return Status::Ok();
  QD_RETURN_IF_ERROR(WriteFlags(kBitmapInUse, 0));
  in_use_ = true;
  return Status::Ok();
}

Status BitmapMarks::WriteMarks(Refcounts& refcounts) {
  if (!in_use_) return Status::Ok();
  const uint64_t cs = s_.cs();
  const uint64_t bits_per_cluster = cs * 8;
  for (const Bitmap& b : bitmaps_) {
    const uint64_t gran = uint64_t(1) << b.granularity_bits;
    const uint64_t last_bit = (s_.header.virtual_size - 1) / gran;
    // Bits to set, by bitmap data cluster (table entry).
    std::map<uint64_t, std::vector<std::pair<uint64_t, uint64_t>>> runs;  // entry -> [first, last] bits in it
    for (const auto& [start, end] : written_) {
      uint64_t first = start / gran, last = std::min((end - 1) / gran, last_bit);
      while (first <= last) {
        const uint64_t entry = first / bits_per_cluster;
        const uint64_t end = std::min(last, (entry + 1) * bits_per_cluster - 1);
        auto& v = runs[entry];
        if (!v.empty() && v.back().second + 1 >= first) v.back().second = std::max(v.back().second, end);
        else v.emplace_back(first, end);
        first = end + 1;
      }
    }
    if (runs.empty()) continue;
    std::vector<uint8_t> table(uint64_t(b.table_size) * 8);
    QD_RETURN_IF_ERROR(s_.file->ReadAt(b.table_offset, table));
    bool table_changed = false;
    std::vector<uint8_t> data(cs);
    for (const auto& [entry, bits] : runs) {
      const uint64_t e = LoadBe64(&table[entry * 8]);
      if (e == kTableAllOnes) continue;  // every bit is set already
      uint64_t off = e & kTableOffsetMask;
      if (off == 0) {
        // All zeros so far: a data cluster of its own now.
        QD_ASSIGN_OR_RETURN(off, refcounts.Allocate());
        QD_RETURN_IF_ERROR(s_.meta.CheckTableWrite(off));
        s_.meta.AddTable(off);
        s_.map->NoteFileEnd(off + cs);
        std::fill(data.begin(), data.end(), 0);
        StoreBe64(&table[entry * 8], off);
        table_changed = true;
      } else {
        QD_RETURN_IF_ERROR(s_.file->ReadAt(off, data));
      }
      // QEMU's layout: bit i of the cluster is bit i % 8 of byte i / 8.
      for (const auto& [first, last] : bits)
        for (uint64_t i = first - entry * bits_per_cluster; i <= last - entry * bits_per_cluster; ++i)
          data[i / 8] |= uint8_t(1u << (i % 8));
      QD_RETURN_IF_ERROR(s_.file->WriteAt(off, data));
    }
    if (table_changed) QD_RETURN_IF_ERROR(s_.file->WriteAt(b.table_offset, table));
  }
  written_.clear();
  return Status::Ok();
}

Status BitmapMarks::ClearInUse() {
  if (!in_use_) return Status::Ok();
  QD_RETURN_IF_ERROR(WriteFlags(0, kBitmapInUse));
  in_use_ = false;
  return Status::Ok();
}

}  // namespace qcow2dedup
