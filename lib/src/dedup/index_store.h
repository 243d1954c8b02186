// The dedup index on disk: an array of {be64 host offset, 20-byte key,
// 4 bytes zero} sorted by offset, in refcount-0 clusters past the image's
// end, described by our header extension and guarded by its digest.
#pragma once

#include "dedup/index.h"
#include "format/header.h"
#include "qcow2dedup/file.h"

namespace qcow2dedup {

constexpr uint64_t kIndexEntryBytes = 32;

// Why the index the extension describes cannot be believed before reading
// it (a hash we do not know, or a place outside the file), or Ok. The one
// place these rules live: the writer's LoadIndex and check's audit.
Status CheckIndexPlacement(const DedupExtension& ext, uint64_t cluster_size, uint64_t file_size);

// Whether an entry's host offset can name a data cluster: aligned, past
// the header, and before the index itself.
bool IndexEntryOffsetOk(uint64_t offset, uint64_t cluster_size, const DedupExtension& ext);

// Loads the stored index if the header vouches for it and it is whole.
// Anything short of that is not an error: the caller rebuilds from the data.
Result<bool> LoadIndex(File& file, const Header& h, uint64_t file_size, DedupIndex& index);

// Writes the index at offset and returns the extension that describes it.
Result<DedupExtension> SaveIndex(File& file, const DedupIndex& index, uint32_t cluster_bits, uint64_t offset);

}  // namespace qcow2dedup
