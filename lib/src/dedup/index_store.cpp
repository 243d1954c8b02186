#include "dedup/index_store.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "format/endian.h"

namespace qcow2dedup {

namespace {

// Entries go to and from the file this many at a time: the index is never
// held twice in memory.
constexpr uint64_t kPieceEntries = 32768;

void EncodeEntry(uint8_t* p, uint64_t cluster, const uint8_t* key, uint32_t cluster_bits) {
  StoreBe64(p, cluster << cluster_bits);
  std::memcpy(p + 8, key, DedupIndex::kKeyBytes);
  std::memset(p + 8 + DedupIndex::kKeyBytes, 0, kIndexEntryBytes - 8 - DedupIndex::kKeyBytes);
}

}  // namespace

Status CheckIndexPlacement(const DedupExtension& ext, uint64_t cs, uint64_t file_size) {
  if (ext.hash_algorithm != kHashSha256)
    return Status::Unsupported(fmt::format("unknown hash algorithm {}", ext.hash_algorithm));
  if (ext.index_entries == 0)
    return ext.index_offset == 0 ? Status::Ok() : Status::Corruption("an empty index with an offset");
  if (ext.index_entries > file_size / cs || ext.index_offset % cs != 0 || ext.index_offset < cs ||
      ext.index_offset > file_size || ext.index_entries * kIndexEntryBytes > file_size - ext.index_offset)
    return Status::Corruption(
        fmt::format("{} entries at {:#x} do not fit in the file", ext.index_entries, ext.index_offset));
  return Status::Ok();
}

bool IndexEntryOffsetOk(uint64_t offset, uint64_t cs, const DedupExtension& ext) {
  return offset % cs == 0 && offset >= cs && offset < ext.index_offset;
}

Result<DedupExtension> SaveIndex(File& file, const DedupIndex& index, uint32_t cluster_bits, uint64_t offset) {
  DedupExtension ext;
  ext.index_entries = index.size();
  ext.index_offset = index.size() ? offset : 0;
  Sha256Stream digest;
  std::vector<uint8_t> piece;
  piece.reserve(std::min<uint64_t>(index.size(), kPieceEntries) * kIndexEntryBytes);
  uint64_t at = offset;
  Status status;
  auto flush = [&] {
    digest.Update(piece);
    if (status.ok()) status = file.WriteAt(at, piece);
    at += piece.size();
    piece.clear();
  };
  index.ForEachByCluster([&](const uint8_t* key, uint64_t cluster) {
    piece.resize(piece.size() + kIndexEntryBytes);
    EncodeEntry(piece.data() + piece.size() - kIndexEntryBytes, cluster, key, cluster_bits);
    if (piece.size() == kPieceEntries * kIndexEntryBytes) flush();
  });
  if (!piece.empty()) flush();
  QD_RETURN_IF_ERROR(status);
  ext.index_digest = digest.Finish();
  return ext;
}

Result<bool> LoadIndex(File& file, const Header& h, uint64_t file_size, DedupIndex& index) {
  index.Clear();
  if (!h.dedup_in_sync()) return false;
  const DedupExtension& ext = *h.dedup;
  const uint64_t cs = h.cluster_size();
  if (!CheckIndexPlacement(ext, cs, file_size).ok()) return false;
  if (ext.index_entries == 0) return true;
  // Entries go in as they are read; all of it is dropped if the digest at
  // the end does not vouch for what was read.
  Sha256Stream digest;
  std::vector<uint8_t> piece;
  for (uint64_t done = 0; done < ext.index_entries;) {
    const uint64_t n = std::min(kPieceEntries, ext.index_entries - done);
    piece.resize(n * kIndexEntryBytes);
    QD_RETURN_IF_ERROR(file.ReadAt(ext.index_offset + done * kIndexEntryBytes, piece));
    digest.Update(piece);
    for (uint64_t i = 0; i < n; ++i) {
      const uint8_t* p = &piece[i * kIndexEntryBytes];
      uint64_t off = LoadBe64(p);
      if (!IndexEntryOffsetOk(off, cs, ext)) {
        index.Clear();
        return false;
      }
      Digest d{};
      std::memcpy(d.data(), p + 8, DedupIndex::kKeyBytes);
      index.Insert(d, off / cs);
    }
    done += n;
  }
  if (digest.Finish() != ext.index_digest) {
    index.Clear();
    return false;
  }
  return true;
}

}  // namespace qcow2dedup
