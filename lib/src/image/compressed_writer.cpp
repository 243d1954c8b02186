// The write path's compressed clusters: linking duplicates to a stored
// compressed copy, and storing new ones packed as QEMU packs them.
//
// A compressed L2 entry references every host cluster its bytes touch, once
// per entry (as qemu-img check counts): linking one more guest cluster to a
// compressed copy raises each of those refcounts, and no refcount may pass
// the share limit, which a cluster holding several fragments reaches sooner.
#include <fmt/format.h>

#include <cstring>

#include "dedup/hash_compressed.h"
#include "format/compression.h"
#include "image/image_state.h"
#include "image/writer.h"

namespace qcow2dedup {
namespace {

// The descriptor as the index keys it: the entry without COPIED (which a
// compressed entry must not carry, but a damaged one might).
uint64_t Key(uint64_t entry) { return entry & ~kFlagCopied; }

}  // namespace

Status Writer::LoadCompressed() {
  compressed_.Clear();
  const auto& l1 = s_.map->l1();
  const uint64_t per = s_.header.l2_entries();
  for (uint64_t i = 0; i < l1.size(); ++i) {
    if (!L1Offset(l1[i])) continue;
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, s_.map->cache().Get(L1Offset(l1[i])));
    for (uint64_t j = 0; j < per; ++j) {
      const uint64_t e = LoadBe64(t->data() + j * s_.header.l2_entry_bytes());
      if (IsCompressed(e)) compressed_.AddReference(Key(e));
    }
  }
  if (compressed_.size() == 0) return Status::Ok();
  // Each descriptor decompressed and hashed once, on every core. One that
  // does not decompress (or cannot be read) stays unhashed: never found,
  // never linked to.
  std::vector<uint64_t> descriptors;
  compressed_.ForEachDescriptor([&](uint64_t d) { descriptors.push_back(d); });
  QD_RETURN_IF_ERROR(data_.Flush());
  QD_ASSIGN_OR_RETURN(uint64_t file_size, s_.file->Size());
  return HashCompressedClusters(*s_.file, file_size, s_.header, descriptors, nullptr,
                                [&](uint64_t d, const Result<Digest>& digest) {
                                  if (digest.ok()) compressed_.SetDigest(d, digest.value());
                                });
}

Result<bool> Writer::CompressedHasRoom(uint64_t descriptor) {
  if (compressed_.References(descriptor) == 0) return false;
  const uint32_t bits = s_.header.cluster_bits;
  const CompressedDescriptor d = DecodeCompressed(descriptor, bits);
  for (uint64_t c = FirstHostCluster(d, bits); c <= LastHostCluster(d, bits); ++c) {
    QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(c));
    if (rc == 0 || rc + 1 > ShareLimit(s_.header) || s_.meta.IsTable(c << bits) || s_.meta.FixedStructureAt(c << bits))
      return false;
  }
  return true;
}

Status Writer::AddCompressedReference(uint64_t descriptor) {
  const uint32_t bits = s_.header.cluster_bits;
  const CompressedDescriptor d = DecodeCompressed(descriptor, bits);
  for (uint64_t c = FirstHostCluster(d, bits); c <= LastHostCluster(d, bits); ++c)
    QD_RETURN_IF_ERROR(refcounts_->Adjust(c, +1).status());
  compressed_.AddReference(descriptor);
  index_changed_ = true;
  return Status::Ok();
}

// Whether the compressed copy at descriptor, which the index names for w's
// digest, may take one more reference: still in use, every cluster it
// touches under the share limit, and (verify) its bytes w's.
Result<bool> Writer::CanShareCompressed(uint64_t descriptor, const ClusterWrite& w) {
  QD_ASSIGN_OR_RETURN(bool room, CompressedHasRoom(descriptor));
  if (!room) return false;
  if (s_.verify) {
    const uint64_t cs = s_.cs();
    const CompressedDescriptor d = DecodeCompressed(descriptor, s_.header.cluster_bits);
    std::vector<uint8_t> in(std::min<uint64_t>(d.bytes, 2 * cs + 512)), out(cs);
    QD_RETURN_IF_ERROR(FlushDataOverlapping(d.offset, in.size()));
    QD_RETURN_IF_ERROR(s_.file->ReadAt(d.offset, in));
    if (!Decompress(s_.header.compression, in, out).ok()) return false;
    if (std::memcmp(out.data(), w.data.data(), cs) != 0) return false;
  }
  return true;
}

Result<uint64_t> Writer::StoreCompressed(std::span<const uint8_t> bytes) {
  const uint32_t bits = s_.header.cluster_bits;
  const uint64_t limit = ShareLimit(s_.header);
  CompressedPacker::Hooks hooks{
      [&]() -> Result<uint64_t> {
        QD_ASSIGN_OR_RETURN(uint64_t host, refcounts_->Allocate());
        QD_RETURN_IF_ERROR(s_.meta.CheckDataWrite(host));
        return host;
      },
      [&](uint64_t c) -> Result<bool> {
        QD_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(c));
        return rc > 0 && rc + 1 <= limit;
      },
      [&](uint64_t c) { return refcounts_->Adjust(c, +1).status(); },
  };
  auto placed = packer_.Place(bytes.size(), hooks);
  if (!placed.ok()) {
    packer_.Reset();
    return placed.status();
  }
  const uint64_t at = *placed;
  QD_RETURN_IF_ERROR(data_.Write(at, bytes));
  s_.map->NoteFileEnd(((at + bytes.size() - 1) >> bits << bits) + s_.cs());
  return EncodeCompressed(at, bytes.size(), bits);
}

Result<std::optional<uint64_t>> Writer::CompressedEntryFor(const ClusterWrite& w, uint64_t old) {
  if (std::optional<uint64_t> found = compressed_.Find(w.digest)) {
    if (IsCompressed(old) && Key(old) == *found) {
      ++stats_.dedup_hits;
      return std::optional<uint64_t>(old);  // already linked to it
    }
    QD_ASSIGN_OR_RETURN(bool share, CanShareCompressed(*found, w));
    if (share) {
      QD_RETURN_IF_ERROR(AddCompressedReference(*found));
      ++stats_.dedup_hits;
      return found;
    }
  }
  if (!w.compress) return std::optional<uint64_t>();
  std::span<const uint8_t> bytes = w.compressed;
  if (bytes.empty()) {
    // Not compressed ahead (another chunk claimed the data first): here.
    const uint64_t cs = s_.cs();
    compress_buf_.resize(cs);
    const size_t n = Compress(s_.header.compression, w.data, std::span<uint8_t>(compress_buf_).first(cs - 512));
    if (!WorthCompressing(n, cs)) return std::optional<uint64_t>();
    bytes = std::span<const uint8_t>(compress_buf_).first(n);
  }
  QD_ASSIGN_OR_RETURN(uint64_t descriptor, StoreCompressed(bytes));
  compressed_.AddReference(descriptor, &w.digest);
  ++stats_.new_clusters;
  ++stats_.compressed_clusters;
  stats_.compressed_bytes += bytes.size();
  index_changed_ = true;
  return std::optional<uint64_t>(descriptor);
}

}  // namespace qcow2dedup
