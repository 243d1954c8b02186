#include "dedup/index_store.h"

#include <algorithm>
#include <cstring>

#include "format/endian.h"

namespace qcow2dedup {

std::vector<uint8_t> EncodeIndex(const DedupIndex& index, uint32_t cluster_bits) {
  std::vector<std::pair<uint64_t, const uint8_t*>> entries;
  entries.reserve(index.size());
  index.ForEach([&](const uint8_t* key, uint64_t cluster) { entries.emplace_back(cluster, key); });
  // By cluster, then key: the same index always encodes to the same bytes.
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first : std::memcmp(a.second, b.second, DedupIndex::kKeyBytes) < 0;
  });
  std::vector<uint8_t> out(entries.size() * kIndexEntryBytes, 0);
  for (size_t i = 0; i < entries.size(); ++i) {
    uint8_t* p = &out[i * kIndexEntryBytes];
    StoreBe64(p, entries[i].first << cluster_bits);
    std::memcpy(p + 8, entries[i].second, DedupIndex::kKeyBytes);
  }
  return out;
}

Result<DedupExtension> SaveIndex(File& file, const DedupIndex& index, uint32_t cluster_bits, uint64_t offset) {
  std::vector<uint8_t> bytes = EncodeIndex(index, cluster_bits);
  DedupExtension ext;
  ext.index_entries = index.size();
  ext.index_offset = bytes.empty() ? 0 : offset;
  ext.index_digest = Sha256(bytes);
  if (!bytes.empty()) QD_RETURN_IF_ERROR(file.WriteAt(offset, bytes));
  return ext;
}

Result<bool> LoadIndex(File& file, const Header& h, uint64_t file_size, DedupIndex& index) {
  index.Clear();
  if (!h.dedup_in_sync() || h.dedup->hash_algorithm != kHashSha256) return false;
  const DedupExtension& ext = *h.dedup;
  const uint64_t cs = h.cluster_size();
  if (ext.index_entries == 0) return ext.index_offset == 0;
  if (ext.index_entries > file_size / cs || ext.index_offset % cs != 0 || ext.index_offset < cs ||
      ext.index_offset > file_size || ext.index_entries * kIndexEntryBytes > file_size - ext.index_offset)
    return false;
  std::vector<uint8_t> bytes(ext.index_entries * kIndexEntryBytes);
  QD_RETURN_IF_ERROR(file.ReadAt(ext.index_offset, bytes));
  if (Sha256(bytes) != ext.index_digest) return false;
  for (uint64_t i = 0; i < ext.index_entries; ++i) {
    const uint8_t* p = &bytes[i * kIndexEntryBytes];
    uint64_t off = LoadBe64(p);
    if (off % cs != 0 || off < cs || off >= ext.index_offset) {
      index.Clear();
      return false;
    }
    Digest d{};
    std::memcpy(d.data(), p + 8, DedupIndex::kKeyBytes);
    index.Insert(d, off / cs);
  }
  return true;
}

}  // namespace qcow2dedup
