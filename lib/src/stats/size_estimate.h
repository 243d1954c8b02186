// What a dedup image of a disk would weigh, for --simulate.
#pragma once

#include <cstdint>

namespace qcow2dedup {

// The file Image::Create + convert would leave for a disk of virtual_size
// bytes whose non-zero clusters touch l2_tables L2 tables and hold unique
// distinct clusters, at 16-bit refcounts:
//   clusters = header (1) + refcount table (sized for the whole disk, as
//              Image::Create sizes it) + refcount blocks (cluster_size / 2
//              entries each, covering every cluster counted here, themselves
//              included) + L1 (8 bytes per L2 table's span of the disk) +
//              l2_tables + unique
//   bytes    = clusters * cluster_size + unique * 32 (the index, past the end)
uint64_t EstimateImageSize(uint64_t virtual_size, uint64_t cluster_size, uint64_t l2_tables, uint64_t unique);

}  // namespace qcow2dedup
