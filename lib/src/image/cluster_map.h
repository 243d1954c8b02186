// The guest-to-host map: the L1 table (kept in memory) and the L2 tables
// (through a cache). Lookup turns a guest offset into a plan that the
// reader executes: unallocated, zero, data at a host offset, or compressed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "format/entries.h"
#include "format/header.h"
#include "image/metadata_map.h"
#include "image/table_cache.h"

namespace qcow2dedup {

enum class ClusterKind { kUnallocated, kZero, kData, kCompressed };

struct Plan {
  ClusterKind kind;
  uint64_t host_offset;  // kData: where the guest offset's byte is
  uint64_t entry;        // the raw L2 entry (kCompressed: the descriptor)
  uint64_t length;       // bytes from the guest offset this plan covers
};

// One L2 entry, decoded and vetted: what its guest cluster holds as a whole.
// Extended L2: data if any subcluster is allocated, zero if all 32 are
// zero-flagged, unallocated otherwise.
struct L2Entry {
  ClusterKind kind;
  uint64_t host;    // kData: the host cluster; kCompressed: the compressed bytes' offset
  uint64_t raw;     // the entry as stored
  uint64_t bitmap;  // extended L2: the subcluster bitmap
};

class ClusterMap {
 public:
  ClusterMap(File* file, Header* header, MetadataMap* meta, uint64_t cache_tables);

  // Reads the active L1 table and vets its entries.
  Status Load(uint64_t file_size);

  Result<Plan> Lookup(uint64_t guest_offset);

  // The one L2 entry decoder: the entry at p, for guest cluster
  // guest_cluster; entries the reader would refuse are Corruption.
  Result<L2Entry> Decode(uint64_t guest_cluster, const uint8_t* p) const;

  // The raw L2 entry of a guest cluster; 0 without a table.
  Result<uint64_t> GetEntry(uint64_t guest_cluster);
  // Its subcluster bitmap (extended L2); 0 without a table or without
  // extended L2.
  Result<uint64_t> GetBitmap(uint64_t guest_cluster);
  // Sets the entry (and with extended L2 its bitmap); the guest cluster's L2
  // table must exist and be ours alone (the writer creates or copies it first).
  Status SetEntry(uint64_t guest_cluster, uint64_t entry, uint64_t bitmap = 0);
  // Points L1 entry l1_index at a new, empty L2 table at host offset table.
  Status AddTable(uint64_t l1_index, uint64_t table);
  // Sets COPIED on L1 entry l1_index: its table's refcount is 1.
  Status SetL1Copied(uint64_t l1_index);

  // Gives the L1 table a new home of new_size entries (the header already
  // points there); entries keep their values.
  void MoveL1(uint32_t new_size) {
    l1_.resize(new_size, 0);
    l1_dirty_ = true;
  }

  Status WriteTables() { return l2_.WriteBack(); }
  Status WriteL1();
  // The writer grew the file: data up to end may now be referenced.
  void NoteFileEnd(uint64_t end) { file_size_ = std::max(file_size_, end); }
  TableCache& cache() { return l2_; }
  const std::vector<uint64_t>& l1() const { return l1_; }

  // Vets an L2 table offset (from an L1 entry) before it is read.
  Status CheckL2Offset(uint64_t index, uint64_t offset) const;
  // Vets a data cluster offset from an L2 entry.
  Status CheckDataOffset(uint64_t guest_offset, uint64_t host) const;

 private:
  File* file_;
  Header* h_;
  MetadataMap* meta_;
  TableCache l2_;
  std::vector<uint64_t> l1_;
  uint64_t file_size_ = 0;
  bool l1_dirty_ = false;
};

}  // namespace qcow2dedup
