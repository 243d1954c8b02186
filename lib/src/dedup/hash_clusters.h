// Reading and hashing many host clusters: batches of 64 MiB (256 MiB
// uncached), each read in runs of adjacent clusters (up to 1 MiB a read,
// 2 MiB uncached) and hashed on every core, handed on in the order asked for.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "dedup/sha256.h"
#include "qcow2dedup/file.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup {

// kBypass: a pass that reads each cluster once and never again (dedup in
// place) reads past the page cache (File::ReadUncached).
enum class Caching { kCached, kBypass };

// Calls done(cluster, digest) for each of clusters, in order; progress
// counts clusters.
Status HashClusters(File& file, uint64_t cluster_size, std::span<const uint64_t> clusters,
                    const ProgressFn& progress, const std::function<void(uint64_t, const Digest&)>& done,
                    Caching caching = Caching::kCached);

}  // namespace qcow2dedup
