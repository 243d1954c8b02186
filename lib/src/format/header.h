// The qcow2 header in cluster 0: the raw big-endian layout, its header
// extensions, and the validated Header the rest of the library works with.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "format/endian.h"
#include "qcow2dedup/status.h"

namespace qcow2dedup {

constexpr uint32_t kQcowMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint32_t kMinClusterBits = 9, kMaxClusterBits = 21;
constexpr uint64_t kMaxL1Bytes = 32u << 20;        // QEMU's QCOW_MAX_L1_SIZE
constexpr uint64_t kMaxRefTableBytes = 8u << 20;   // QEMU's QCOW_MAX_REFTABLE_SIZE
constexpr uint32_t kMaxSnapshots = 65536;
constexpr uint64_t kMaxVirtualSize = 1ull << 61;   // beyond what L1 can address anyway

// Feature bits (qcow2-facts.md).
constexpr uint64_t kIncompatDirty = 1ull << 0;
constexpr uint64_t kIncompatCorrupt = 1ull << 1;
constexpr uint64_t kIncompatDataFile = 1ull << 2;
constexpr uint64_t kIncompatCompression = 1ull << 3;
constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
constexpr uint64_t kIncompatKnown = (1ull << 5) - 1;
constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
// Ours: "the dedup index matches the image". Anyone who writes the image
// without knowing it clears it, which is exactly when the index goes stale.
constexpr uint64_t kAutoclearDedupInSync = 1ull << 48;

// Header extension types.
constexpr uint32_t kExtEnd = 0x00000000;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureNames = 0x6803f857;
constexpr uint32_t kExtBitmaps = 0x23852875;
constexpr uint32_t kExtEncryption = 0x0537be77;
constexpr uint32_t kExtDataFile = 0x44415441;
constexpr uint32_t kExtDedup = 0x44445550;  // "DDUP": ours

enum class CompressionType : uint8_t { kDeflate = 0, kZstd = 1 };

#pragma pack(push, 1)
struct RawHeader {
  be32 magic;
  be32 version;
  be64 backing_file_offset;
  be32 backing_file_size;
  be32 cluster_bits;
  be64 size;
  be32 crypt_method;
  be32 l1_size;
  be64 l1_table_offset;
  be64 refcount_table_offset;
  be32 refcount_table_clusters;
  be32 nb_snapshots;
  be64 snapshots_offset;
  // Version 3 from here on.
  be64 incompatible_features;
  be64 compatible_features;
  be64 autoclear_features;
  be32 refcount_order;
  be32 header_length;
  uint8_t compression_type;
  uint8_t padding[7];
};

// Our extension: where the dedup index lives and what it holds. The index
// itself (dedup/index_table.h) sits in clusters with refcount 0, which QEMU
// neither counts as leaks nor protects; the autoclear bit says whether it
// can still be believed. Version 1 (a sorted array, read whole) is no longer
// read: its images rebuild the index on their next write.
struct RawDedupExtension {
  be32 version;         // 2
  be32 hash_algorithm;  // 1 = SHA-256
  be64 index_offset;    // 0: no index stored
  be64 index_entries;
  be64 index_buckets;   // a power of two
  be64 free_hint;       // no free cluster lies below this one (a hint)
  be64 compressed;      // compressed clusters in use (0: the writer need not look for any)
  // Duplicates that may be stored for lack of index memory (-o index_memory;
  // dedup/session_index.h). Zero in images written before it existed.
  be64 memory_misses;
};
#pragma pack(pop)
static_assert(sizeof(RawHeader) == 112);
static_assert(sizeof(RawDedupExtension) == 56);
constexpr uint32_t kV2HeaderLength = 72;
constexpr uint32_t kHashSha256 = 1;
// 3: index entries hold 40-bit fingerprints (2 held 160-bit keys): a table
// of another version is not read, and the writer rebuilds it from the data.
constexpr uint32_t kDedupExtensionVersion = 3;

struct DedupExtension {
  uint32_t hash_algorithm = kHashSha256;
  uint64_t index_offset = 0;
  uint64_t index_entries = 0;
  uint64_t index_buckets = 0;
  uint64_t free_hint = 0;
  uint64_t compressed = 0;
  uint64_t memory_misses = 0;
  uint32_t version = kDedupExtensionVersion;
};

struct Header {
  uint32_t version = 3;
  uint32_t cluster_bits = 16;
  uint64_t virtual_size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_offset = 0;
  uint64_t reftable_offset = 0;
  uint32_t reftable_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible = 0;
  uint64_t compatible = 0;
  uint64_t autoclear = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = sizeof(RawHeader);
  CompressionType compression = CompressionType::kDeflate;
  std::vector<uint8_t> header_tail;  // header bytes past RawHeader, kept verbatim
  uint32_t repeated_extension = 0;   // the first extension type found twice (0: none)

  std::string backing_file;
  std::optional<std::string> backing_format;
  std::optional<DedupExtension> dedup;
  // Feature name table: (group, bit) -> name; group 0 incompatible, 1 compatible, 2 autoclear.
  std::map<std::pair<int, int>, std::string> feature_names;
  // Extensions we do not interpret, kept verbatim so a rewrite loses nothing.
  std::vector<std::pair<uint32_t, std::vector<uint8_t>>> other_extensions;

  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  bool extended_l2() const { return incompatible & kIncompatExtendedL2; }
  uint32_t l2_entry_bytes() const { return extended_l2() ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / l2_entry_bytes(); }
  uint64_t subclusters() const { return extended_l2() ? 32 : 1; }
  // Guest bytes one L2 table maps.
  uint64_t l2_span() const { return l2_entries() * cluster_size(); }
  uint64_t refblock_entries() const { return cluster_size() * 8 / refcount_bits(); }
  uint64_t max_refcount() const {
    return refcount_order == 6 ? ~0ull : (1ull << refcount_bits()) - 1;
  }
  bool lazy_refcounts() const { return compatible & kCompatLazyRefcounts; }
  bool dedup_in_sync() const {
    return dedup && dedup->version == kDedupExtensionVersion && (autoclear & kAutoclearDedupInSync);
  }
};

// L1 entries needed to map virtual_size bytes.
uint64_t L1EntriesFor(uint64_t virtual_size, const Header& h);

// Three steps, so that check can read a damaged header as QEMU does.
// DecodeHeader: cluster 0 (or as much of it as the file holds) into a
// Header, refusing only what cannot be decoded (the magic, the version,
// cluster_bits, header_length, refcount_order, extensions, the backing
// file name).
Result<Header> DecodeHeader(std::span<const uint8_t> head);
// ValidateHeader: what QEMU's qcow2_open refuses: features, sizes beyond
// the format's limits, misaligned or unaddressable tables. A table past
// the end of the file is not refused: it reads as zeros, as in QEMU.
Status ValidateHeader(const Header& h);
// CheckUsable: what QEMU opens but this library does not work with: a
// header_length that is not a multiple of 8, an extension twice, tables
// over the header, an empty refcount table, a snapshot table past the end
// of the file. Check reports the damage among these instead.
Status CheckUsable(const Header& h, uint64_t file_size);
// All three.
Result<Header> ParseHeader(std::span<const uint8_t> head, uint64_t file_size);

// Encodes the header, its extensions and the backing file name for cluster 0.
// Fails if they do not fit in one cluster.
Result<std::vector<uint8_t>> EncodeHeader(const Header& h);

// "dirty, corrupt, ..." with names from the image's table where it has them.
std::string DescribeFeatures(const Header& h, int group, uint64_t bits);

}  // namespace qcow2dedup
