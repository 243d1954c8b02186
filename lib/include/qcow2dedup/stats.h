// dedup-stats: what deduplication saved in an image, and what optimal
// dedup would store at other cluster sizes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qcow2dedup/image.h"

#pragma GCC visibility push(default)  // the public API: exported from the shared library

namespace qcow2dedup {

// "Refcount" in these statistics is the number of references from the
// active L2 tables: what dedup produced. The stored refcounts agree on a
// sound image without internal snapshots; they are not read here.

// Buckets go by powers of two: 1, 2, 3-4, 5-8, 9-16, ..., from the first up
// to the last that holds a cluster (empty ones in between included).
struct HistogramBucket {
  uint64_t refcount_min = 0, refcount_max = 0;
  uint64_t stored_clusters = 0;  // host data clusters with a refcount in range
  uint64_t references = 0;       // guest clusters pointing at them
};

struct SharedCluster {
  // Of the host cluster; of the compressed bytes for a compressed cluster.
  uint64_t host_offset = 0;
  uint64_t refcount = 0;
  std::vector<uint64_t> guest_offsets;  // the lowest 8 at most
};

struct DedupStats {
  std::string filename;
  uint64_t virtual_size = 0;
  uint64_t cluster_size = 0;
  uint64_t guest_clusters = 0;   // virtual size / cluster size, rounded up
  // data + zero + backing = guest clusters.
  uint64_t data_clusters = 0;    // guest clusters that hold data (allocated or compressed)
  // Zero-flagged (even with a preallocated host cluster), or unallocated
  // where no backing file shows through (none, or past its end).
  uint64_t zero_clusters = 0;
  uint64_t backing_clusters = 0; // unallocated, read from the backing file
  // Distinct host clusters the data clusters point at (a compressed cluster
  // counts once per distinct compressed descriptor).
  uint64_t stored_clusters = 0;
  double dedup_ratio = 1.0;      // data / stored (1 without data)
  // Compression (convert -c), apart from dedup and with it, as zdb -DD's
  // "dedup = X, compress = Y, copies = 1" (qcow2 keeps one copy).
  uint64_t compressed_clusters = 0;  // of the stored clusters, compressed
  // What the stored data takes in the file: a host cluster for each stored
  // uncompressed one, and the host clusters compressed bytes touch (several
  // compressed clusters share one).
  uint64_t stored_bytes = 0;
  double compress_ratio = 1.0;   // stored clusters * cluster size / stored bytes
  double total_ratio = 1.0;      // data bytes / stored bytes = dedup * compress
  uint64_t saved_bytes = 0;      // (data - stored) * cluster size
  double saving_percent = 0;     // saved bytes / data bytes * 100 (0 without data)
  // Stored clusters that `dedup` would free: copies of data stored elsewhere
  // too, and zeros (uncompressed clusters only).
  uint64_t reclaimable_clusters = 0;
  // At most this many stored clusters are duplicates stored for lack of
  // index memory (-o index_memory): the header's count, 0 when no cap was
  // reached (man page, "index_memory").
  uint64_t memory_misses = 0;
  struct Metadata {
    uint64_t l1 = 0;        // the L1 table, rounded up to whole clusters
    uint64_t l2 = 0;        // active L2 tables * cluster size
    uint64_t refcount = 0;  // refcount table and blocks
    uint64_t index = 0;     // stored dedup index entries * 32
    uint64_t total() const { return l1 + l2 + refcount + index; }
  } metadata;
  std::vector<HistogramBucket> histogram;
  std::vector<SharedCluster> top;  // refcount >= 2; refcount desc, host offset asc
};

// Reads metadata (L1, L2, refcount table, header) and, for what `dedup`
// would reclaim, the stored dedup index when it is in sync; otherwise (an
// image QEMU wrote) it hashes every stored cluster, reporting progress.
// Memory: 4 bytes per host cluster of the image file's data.
Result<DedupStats> ComputeDedupStats(const std::string& path, size_t top_count = 10,
                                     bool force_share = false, const ProgressFn& progress = {});

struct Simulation {
  uint64_t cluster_size = 0;
  uint64_t clusters = 0;  // in the virtual disk (a partial last one padded with zeros)
  uint64_t nonzero = 0;
  uint64_t unique = 0;    // distinct non-zero clusters: what optimal dedup stores
  double ratio = 1.0;     // nonzero / unique (1 without data)
  // The file convert would write (16-bit refcounts): header, refcount table
  // (sized for the whole disk, as create does), refcount blocks, L1, the L2
  // tables that map a non-zero cluster, the unique clusters, and 32 bytes of
  // dedup index per unique cluster.
  uint64_t estimated_image_size = 0;
  // With compression asked for (convert -c): of the unique clusters, those
  // that compress by a sector or more; their compressed bytes, packed as
  // convert -c packs them; and the image that would take (as above, with
  // the unique clusters' share being the uncompressed ones plus the
  // compressed bytes in whole clusters). 0 without compression.
  uint64_t compressible = 0;
  uint64_t compressed_bytes = 0;
  uint64_t estimated_compressed_image_size = 0;
};

// One sequential pass over the device, every cluster size at once; zero
// runs the device reports are skipped unread. Cluster sizes must be powers
// of two from 512 to 2M (InvalidArgument otherwise); results come in the
// order asked. Memory: 18 to 23 bytes per distinct cluster, summed over the
// sizes (a 1 TiB disk of distinct 4K clusters: about 5.5 GiB), and 16 MiB
// of buffers. progress gets (bytes scanned, device size).
// compression: also compress each unique cluster (on every core), as
// convert -c would, to estimate the compressed image.
Result<std::vector<Simulation>> SimulateDedup(BlockDevice& device, const std::vector<uint64_t>& cluster_sizes,
                                              ProgressFn progress = {},
                                              std::optional<Compression> compression = std::nullopt);

// dedup-stats --simulate over several images, a fleet of VM disks: what
// they would store laid out three ways, to choose a layout before
// converting anything (as zdb -S does for a pool).
struct OverlaySimulation {
  // The image's non-zero clusters that differ from the base's at the same
  // offset (past the base's end the base reads as zeros): what a qcow2
  // overlay with the base as its backing file must hold.
  uint64_t differing = 0;
  uint64_t unique = 0;  // of them, the distinct ones: what a dedup overlay stores
  // The overlay file convert would write (as Simulation's estimate, its
  // L2 tables those that map a differing cluster).
  uint64_t estimated_image_size = 0;
};

struct FleetSimulation {
  uint64_t cluster_size = 0;
  // Each image in a dedup image of its own, as SimulateDedup (no
  // compression figures), in the order given.
  std::vector<Simulation> alone;
  uint64_t alone_unique = 0;  // their unique clusters summed: what separate images store
  // One dedup image holding all the images, each at a cluster-aligned
  // offset: their non-zero clusters (the sum of alone's) and the distinct
  // ones among them all.
  uint64_t together_nonzero = 0;
  uint64_t together_unique = 0;
  double together_ratio = 1.0;  // together_nonzero / together_unique (1 without data)
  // With a base: the base alone, and each image as an overlay on it (in
  // the order given). The base is not one of the images unless given as one.
  std::optional<Simulation> base;
  std::vector<OverlaySimulation> overlays;
  uint64_t overlays_unique = 0;  // the overlays' unique clusters summed (without the base's)
};

// Reads each image once (and, with a base, the base once more for itself
// and, where an image holds data, beside that image). Every cluster size at
// once, as SimulateDedup; results in the order asked. Memory: the distinct
// clusters of all the images together, plus those of one image and its
// overlay at a time, at SimulateDedup's 18 to 23 bytes each per size.
// progress gets (bytes scanned, sum of the images' sizes and the base's).
// InvalidArgument without images; a read error is prefixed with the name
// of the image it came from ("NAME: message").
// One image of the fleet (device not null, and not read by anyone else
// meanwhile); its name leads the messages of errors reading it.
struct FleetImage {
  std::string name;
  BlockDevice* device = nullptr;
};

Result<std::vector<FleetSimulation>> SimulateFleet(const std::vector<FleetImage>& images,
                                                   const std::optional<FleetImage>& base,
                                                   const std::vector<uint64_t>& cluster_sizes,
                                                   ProgressFn progress = {});

}  // namespace qcow2dedup

#pragma GCC visibility pop
