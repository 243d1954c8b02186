// What every part of check works on: the file, the header as it stands on
// disk (repair changes it as it goes), and the report a pass fills in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "format/entries.h"
#include "format/header.h"
#include "format/snapshot.h"
#include "qcow2dedup/check.h"
#include "qcow2dedup/file.h"

namespace qcow2dedup::check {

// Entry masks are format/entries.h's; a refcount table entry's offset:
constexpr uint64_t kRefTableOffsetBits = ~kRefTableReservedMask;

// Header fields repair patches in place (byte offsets in cluster 0).
constexpr uint64_t kHeaderRefTableAt = offsetof(RawHeader, refcount_table_offset);
constexpr uint64_t kHeaderIncompatibleAt = offsetof(RawHeader, incompatible_features);
constexpr uint64_t kHeaderAutoclearAt = offsetof(RawHeader, autoclear_features);

struct Context {
  File* file = nullptr;
  Header header;
  uint64_t file_size = 0;
  SnapshotTable snapshots;
  std::vector<bool> snapshot_incomplete;  // entries without the extra data v3 requires
  bool writable = false;
  // QEMU reports the first corruption event it meets while reading the
  // image, and suppresses the rest.
  bool corruption_signalled = false;

  uint64_t cs() const { return header.cluster_size(); }
  uint32_t bits() const { return header.cluster_bits; }
  // The file's length as QEMU's block layer gives it: whole 512-byte sectors.
  uint64_t SectorLength() const { return (file_size + 511) / 512 * 512; }
  // Clusters the file holds, the last one perhaps partly.
  uint64_t FileClusters() const { return (file_size + cs() - 1) / cs(); }

  // Reads only what lies inside the file: an offset taken from a damaged
  // table may be anywhere below 2^64, and past the end everything is zero
  // (as QEMU's block layer reads it).
  Status Read(uint64_t offset, std::span<uint8_t> buf);
  Status Write(uint64_t offset, std::span<const uint8_t> data);
  // Rewrites one big-endian header field; the rest of cluster 0 stays as is.
  Status WriteHeaderField(uint64_t at, uint64_t value, int bytes);
  Result<uint64_t> RefreshFileSize();
};

// Reads the snapshot table leniently (snapshots.cpp): what QEMU opens,
// check must be able to report on.
Status ReadSnapshots(Context& ctx);

// Adds one finding to a report. The list is bounded: a hostile image can
// produce a finding for every cluster of a huge file.
void Note(CheckReport& r, Finding f);
inline void Note(CheckReport& r, FindingArea area, FindingKind kind, std::string text,
                 std::optional<uint64_t> cluster = std::nullopt) {
  Note(r, Finding{area, kind, cluster, std::move(text)});
}
// Whether r holds as many findings as it lists (the rest are not kept).
bool Full(const CheckReport& r);
// The note that says further findings are not listed.
bool IsOverflowNote(const Finding& f);
// Appends from's findings to into's.
void NoteAll(CheckReport& into, const CheckReport& from);

// The word qemu-img starts a line of that kind with ("" for a note), so
// that a line's words and its kind cannot disagree.
const char* Word(FindingKind kind);

}  // namespace qcow2dedup::check
