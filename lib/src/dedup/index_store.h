// The dedup index on disk: an array of {be64 host offset, 20-byte key,
// 4 bytes zero} sorted by offset, in refcount-0 clusters past the image's
// end, described by our header extension and guarded by its digest.
#pragma once

#include "dedup/index.h"
#include "format/header.h"
#include "qcow2dedup/file.h"

namespace qcow2dedup {

constexpr uint64_t kIndexEntryBytes = 32;

// Loads the stored index if the header vouches for it and it is whole.
// Anything short of that is not an error: the caller rebuilds from the data.
Result<bool> LoadIndex(File& file, const Header& h, uint64_t file_size, DedupIndex& index);

// Writes the index at offset and returns the extension that describes it.
Result<DedupExtension> SaveIndex(File& file, const DedupIndex& index, uint32_t cluster_bits, uint64_t offset);

}  // namespace qcow2dedup
