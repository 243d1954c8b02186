// The active L2 tables, decoded for statistics: what each guest cluster
// holds, straight from the entries and without reading guest data.
#pragma once

#include <cstdint>
#include <vector>

#include "image/image_state.h"

namespace qcow2dedup {

struct GuestCluster {
  uint64_t index;  // guest cluster number
  ClusterKind kind;
  // kData: the host cluster's offset; kCompressed: the compressed bytes' offset.
  uint64_t host;
  uint64_t entry;  // the raw L2 entry (kCompressed: its descriptor)
};

// Decodes the L2 table of L1 entry l1_index into one GuestCluster for each
// guest cluster below guest_clusters that it maps; none without a table.
// Entries the reader would refuse are Corruption here too.
//
// (ClusterMap::Decode is the decoder.)
Status DecodeL2Table(ImageState& s, uint64_t l1_index, uint64_t guest_clusters, std::vector<GuestCluster>& out);

}  // namespace qcow2dedup
