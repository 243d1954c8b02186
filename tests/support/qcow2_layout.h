// An independent reader of a qcow2 file's layout, written from QEMU's
// docs/interop/qcow2.rst and sharing no code with the library: the header,
// the L1/L2 tables, the refcount table and blocks. Interop tests use it as
// a judge of what the library stored (distinct host data clusters, shared
// clusters, refcounts, COPIED flags, the zero flag).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace testing {

struct Qcow2Layout {
  // Header.
  uint32_t version = 0;
  uint64_t cluster_size = 0;
  uint64_t virtual_size = 0;
  uint64_t file_size = 0;
  uint64_t incompatible = 0, compatible = 0, autoclear = 0;
  uint32_t refcount_bits = 0;
  uint32_t nb_snapshots = 0;
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;
  uint64_t reftable_offset = 0;
  uint32_t reftable_clusters = 0;
  std::string backing_file;
  // Header extensions: magic -> (offset of the payload in the file, length).
  std::map<uint32_t, std::pair<uint64_t, uint32_t>> extensions;
  // Our "DDUP" extension, when present.
  bool has_dedup_extension = false;
  uint64_t dedup_index_offset = 0;
  uint64_t dedup_index_entries = 0;

  // The L2 entry of every guest cluster (0 where the L1 entry is empty).
  std::vector<uint64_t> l2_entries;
  std::vector<uint64_t> l2_tables;  // host offsets of the L2 tables
  std::vector<uint64_t> refblocks;  // host offsets of the refcount blocks
  // Host cluster number -> references from L2 entries without the zero flag.
  std::map<uint64_t, uint64_t> data_refs;
  // Host cluster number -> references from zero-flagged L2 entries that keep
  // their allocation (QEMU's "zero, allocated").
  std::map<uint64_t, uint64_t> zero_alloc_refs;
  uint64_t compressed_entries = 0;
  // Host cluster number -> refcount, for every cluster whose refcount is not 0.
  std::map<uint64_t, uint64_t> refcounts;

  // Findings of our own consistency check (snapshot-free images only).
  uint64_t refcount_mismatches = 0;  // stored refcount != references counted
  uint64_t copied_mismatches = 0;    // COPIED set iff refcount == 1 is violated
  std::vector<std::string> problems;  // the first few, for messages

  static constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;
  static constexpr uint64_t kCopied = 1ull << 63;
  static constexpr uint64_t kCompressed = 1ull << 62;
  static constexpr uint64_t kZero = 1ull;

  uint64_t stored_data_clusters() const { return data_refs.size(); }
  uint64_t guest_clusters() const { return l2_entries.size(); }
  // Guest clusters whose L2 entry points at host data (zero flag clear).
  uint64_t data_references() const;
  // Largest number of references to one host data cluster.
  uint64_t max_sharing() const;
  // Host byte offset of guest cluster g's data, 0 if none (or zero flagged).
  uint64_t HostOffset(uint64_t g) const;
  bool IsZeroFlagged(uint64_t g) const { return g < l2_entries.size() && (l2_entries[g] & kZero); }
  bool IsUnallocated(uint64_t g) const { return g >= l2_entries.size() || l2_entries[g] == 0; }
};

// Reads the layout of the qcow2 file at path; nullopt with *error set when
// the file is not a qcow2 image this reader understands.
std::optional<Qcow2Layout> ReadQcow2Layout(const std::string& path, std::string* error);

// The whole file's bytes (to show that a failed command left it unchanged).
std::string ReadFileBytes(const std::string& path);
void WriteFileBytes(const std::string& path, const std::string& bytes);
uint64_t FileSize(const std::string& path);

}  // namespace testing
