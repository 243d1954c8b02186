// How many stored clusters `dedup` would free: copies of data stored
// elsewhere too, and clusters of zeros.
#pragma once

#include "image/image_state.h"
#include "stats/host_references.h"

namespace qcow2dedup {

// From the stored index when it is in sync (it holds every copy); else by
// hashing every stored uncompressed cluster, on every core.
Result<uint64_t> CountReclaimable(ImageState& s, const HostReferences& refs, const ProgressFn& progress);

}  // namespace qcow2dedup
