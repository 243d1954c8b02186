// The dedup write path's entry points inside the library.
#pragma once

#include "image/image_state.h"

namespace qcow2dedup {

// Whether we can write images of this format (checked before anything is
// written, repairs included).
Status CheckWritableFormat(const Header& h);

// Readies an image opened read-write: refcounts loaded, the dedup index
// loaded if the header vouches for it, rebuilt from the data otherwise.
Status PrepareForWriting(ImageState& s, const ProgressFn& progress);

// Hashes every uncompressed data cluster the L2 tables reference into the
// index (both cores).
Status RebuildIndex(ImageState& s, const ProgressFn& progress);

// Writes the header from s.header (cluster 0), after the overlap-free check.
Status WriteHeader(ImageState& s);

}  // namespace qcow2dedup
