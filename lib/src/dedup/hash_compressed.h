// Reading, decompressing and hashing many compressed clusters: the
// descriptors sorted by offset and read in runs of neighbouring fragments
// (QEMU packs them back to back, so one read of up to 1 MiB takes many),
// decompressed and hashed on every core.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "dedup/sha256.h"
#include "format/header.h"
#include "qcow2dedup/file.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup {

// The digest of a descriptor's uncompressed cluster, or why there is none:
// kCorruption when its bytes do not decompress to exactly one cluster (the
// guest data is lost); any other kind when reading or decompressing failed.
using CompressedDone = std::function<void(uint64_t descriptor, const Result<Digest>&)>;

// Calls done(descriptor, digest) for each of descriptors (compressed L2
// entries; COPIED is ignored), in the order of their host offsets (the order
// they are read in). Bytes at or past file_size read as zeros, as QEMU's
// block layer reads them. progress counts descriptors.
Status HashCompressedClusters(File& file, uint64_t file_size, const Header& h,
                              std::span<const uint64_t> descriptors, const ProgressFn& progress,
                              const CompressedDone& done);

}  // namespace qcow2dedup
