// The internal snapshot table: one variable-length entry per snapshot.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "format/header.h"
#include "qcow2dedup/file.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup {

struct Snapshot {
  SnapshotInfo info;
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;
  uint64_t disk_size = 0;
};

struct SnapshotTable {
  std::vector<Snapshot> snapshots;
  uint64_t bytes = 0;  // the table's length on disk
};

// Reads and validates the table the header points at.
Result<SnapshotTable> ReadSnapshotTable(File& file, const Header& h, uint64_t file_size);

}  // namespace qcow2dedup
