#include "format/header.h"

#include <fmt/format.h>

#include <cstring>

namespace qcow2dedup {
namespace {

constexpr uint32_t kMaxBackingNameBytes = 1023;  // as QEMU
constexpr uint32_t kFeatureNameEntryBytes = 48;

bool Aligned(uint64_t v, uint64_t a) { return (v & (a - 1)) == 0; }

// QEMU's validate_table_offset(): aligned, and the whole table below
// INT64_MAX. A table past the end of the file reads as zeros, as in QEMU.
Status CheckTableOffset(const char* what, uint64_t offset, uint64_t bytes, uint64_t cluster_size) {
  constexpr uint64_t kQemuLimit = uint64_t(INT64_MAX);
  if (!Aligned(offset, cluster_size))
    return Status::Corruption(fmt::format("{} offset {:#x} is not cluster aligned", what, offset));
  if (offset > kQemuLimit - bytes)
    return Status::Corruption(fmt::format("{} at {:#x} ({} bytes) lies beyond what an image can address", what,
                                          offset, bytes));
  return Status::Ok();
}

const char* KnownFeatureName(int group, int bit) {
  static const char* incompat[] = {"dirty", "corrupt", "external data file",
                                   "compression type", "extended L2 entries"};
  if (group == 0 && bit < 5) return incompat[bit];
  if (group == 1 && bit == 0) return "lazy refcounts";
  if (group == 2 && bit == 0) return "bitmaps";
  if (group == 2 && bit == 1) return "raw external data";
  if (group == 2 && bit == 48) return "dedup index in sync";
  return nullptr;
}

// Extensions from start up to limit (the backing file name or the end of
// the cluster); head may end before limit, and what it lacks reads as zero.
Status ParseExtensions(std::span<const uint8_t> head, uint64_t start, uint64_t limit, Header& h) {
  uint64_t pos = start;
  std::vector<uint32_t> seen;
  const uint64_t end = std::min<uint64_t>(limit, head.size());
  while (true) {
    // QEMU accepts a v3 header whose extensions simply stop at the backing
    // name, but not one whose next extension header would cross it.
    if (pos >= limit) return Status::Ok();
    if (pos + 8 > limit)
      return Status::Corruption(fmt::format("header extension at {:#x} runs past the header", pos));
    if (pos + 8 > end) return Status::Ok();  // past the end of the file: zeros, the end marker
    uint32_t type = reinterpret_cast<const be32*>(&head[pos])[0];
    uint32_t len = reinterpret_cast<const be32*>(&head[pos + 4])[0];
    pos += 8;
    if (type == kExtEnd) return Status::Ok();
    if (len > end - pos)
      return Status::Corruption(fmt::format("header extension {:#010x} length {} runs past the header",
                                            type, len));
    // QEMU reads a repeated extension again (the last one counts); we do
    // not use such a header (CheckUsable), but check must read it.
    for (uint32_t t : seen)
      if (t == type && !h.repeated_extension) h.repeated_extension = type;
    seen.push_back(type);
    std::span<const uint8_t> data = head.subspan(pos, len);
    switch (type) {
      case kExtBackingFormat:
        h.backing_format = std::string(data.begin(), data.end());
        break;
      case kExtFeatureNames:
        for (size_t i = 0; i + kFeatureNameEntryBytes <= data.size(); i += kFeatureNameEntryBytes) {
          const char* name = reinterpret_cast<const char*>(&data[i + 2]);
          h.feature_names[{data[i], data[i + 1]}] = std::string(name, strnlen(name, 46));
        }
        break;
      case kExtDedup: {
        if (len < sizeof(RawDedupExtension)) {
          // Too short to be ours as we write it: ignore it like a stale index.
          h.other_extensions.emplace_back(type, std::vector<uint8_t>(data.begin(), data.end()));
          break;
        }
        RawDedupExtension raw;
        std::memcpy(&raw, data.data(), sizeof raw);
        DedupExtension d;
        d.hash_algorithm = raw.hash_algorithm;
        d.index_offset = raw.index_offset;
        d.index_entries = raw.index_entries;
        d.index_buckets = raw.index_buckets;
        d.free_hint = raw.free_hint;
        d.compressed = raw.compressed;
        d.memory_misses = raw.memory_misses;
        d.version = raw.version;
        h.dedup = d;
        break;
      }
      default:
        h.other_extensions.emplace_back(type, std::vector<uint8_t>(data.begin(), data.end()));
    }
    pos += (uint64_t(len) + 7) & ~7ull;
  }
}

}  // namespace

uint64_t L1EntriesFor(uint64_t virtual_size, const Header& h) {
  uint64_t span = h.l2_span();
  return (virtual_size + span - 1) / span;
}

std::string DescribeFeatures(const Header& h, int group, uint64_t bits) {
  std::string out;
  for (int bit = 0; bit < 64; ++bit) {
    if (!(bits & (1ull << bit))) continue;
    if (!out.empty()) out += ", ";
    auto it = h.feature_names.find({group, bit});
    if (it != h.feature_names.end() && !it->second.empty()) {
      out += it->second;
    } else if (const char* known = KnownFeatureName(group, bit)) {
      out += known;
    } else {
      out += fmt::format("unknown feature bit {}", bit);
    }
  }
  return out;
}

Result<Header> DecodeHeader(std::span<const uint8_t> head) {
  if (head.size() < kV2HeaderLength) return Status::Corruption("file too short for a qcow2 header");
  RawHeader raw;
  std::memset(static_cast<void*>(&raw), 0, sizeof raw);  // bytes of big-endian fields: all zero is valid
  std::memcpy(&raw, head.data(), std::min(head.size(), sizeof raw));
  if (raw.magic != kQcowMagic) return Status::Corruption("not a qcow2 image (bad magic)");
  Header h;
  h.version = raw.version;
  if (h.version != 2 && h.version != 3)
    return Status::Unsupported(fmt::format("qcow2 version {} is not supported", h.version));
  h.cluster_bits = raw.cluster_bits;
  if (h.cluster_bits < kMinClusterBits)
    return Status::Corruption(fmt::format("cluster_bits {} is out of range (9 to 21)", h.cluster_bits));
  if (h.cluster_bits > kMaxClusterBits)  // the format allows more; QEMU and we do not
    return Status::Unsupported(fmt::format("cluster_bits {} is out of range (9 to 21)", h.cluster_bits));
  const uint64_t cs = h.cluster_size();

  if (h.version == 2) {
    h.header_length = kV2HeaderLength;
    h.refcount_order = 4;
  } else {
    h.header_length = raw.header_length;
    if (h.header_length < 104) return Status::Corruption(fmt::format("bad header_length {}", h.header_length));
    if (h.header_length > cs || h.header_length > head.size())
      return Status::Corruption(fmt::format("header_length {} exceeds the first cluster", h.header_length));
    h.incompatible = raw.incompatible_features;
    h.compatible = raw.compatible_features;
    h.autoclear = raw.autoclear_features;
    h.refcount_order = raw.refcount_order;
    if (h.refcount_order > 6)
      return Status::Corruption(fmt::format("refcount_order {} is above 6", h.refcount_order));
    if (h.header_length > 104) h.compression = CompressionType(raw.compression_type);
    // Fields of later versions of the format: kept as they are.
    if (h.header_length > sizeof(RawHeader))
      h.header_tail.assign(head.begin() + sizeof(RawHeader), head.begin() + h.header_length);
  }

  h.virtual_size = raw.size;
  h.crypt_method = raw.crypt_method;
  h.l1_size = raw.l1_size;
  h.l1_offset = raw.l1_table_offset;
  h.reftable_offset = raw.refcount_table_offset;
  h.reftable_clusters = raw.refcount_table_clusters;
  h.nb_snapshots = raw.nb_snapshots;
  h.snapshots_offset = raw.snapshots_offset;

  uint64_t backing_offset = raw.backing_file_offset;
  uint32_t backing_size = raw.backing_file_size;
  uint64_t ext_end = cs;
  if (backing_offset != 0) {
    if (backing_size > kMaxBackingNameBytes || backing_offset >= cs ||
        backing_offset + backing_size > cs || backing_offset < h.header_length)
      return Status::Corruption("backing file name lies outside the header cluster");
    if (backing_offset + backing_size > head.size())
      return Status::Corruption("backing file name lies beyond the end of the file");
    ext_end = std::min<uint64_t>(ext_end, backing_offset);
    h.backing_file.assign(reinterpret_cast<const char*>(&head[backing_offset]), backing_size);
  }
  // Version 2 images carry extensions too, right after the 72-byte header.
  QD_RETURN_IF_ERROR(ParseExtensions(head, h.header_length, ext_end, h));
  return h;
}

Status ValidateHeader(const Header& h) {
  const uint64_t cs = h.cluster_size();
  if (h.virtual_size > kMaxVirtualSize)
    return Status::Corruption(fmt::format("virtual size {} is too large", h.virtual_size));
  uint64_t unknown = h.incompatible & ~kIncompatKnown;
  if (unknown)
    return Status::Unsupported("unsupported incompatible feature: " + DescribeFeatures(h, 0, unknown));
  if (h.incompatible & kIncompatDataFile)
    return Status::Unsupported("images with an external data file are not supported");
  if ((h.incompatible & kIncompatCompression) != (h.compression != CompressionType::kDeflate ? kIncompatCompression : 0))
    return Status::Corruption("compression type and its feature bit disagree");
  if (uint8_t(h.compression) > 1)
    return Status::Unsupported(fmt::format("compression type {} is not supported", int(h.compression)));
  if (h.crypt_method != 0) return Status::Unsupported("encrypted images are not supported");
  if (h.extended_l2() && h.cluster_bits < 14)
    return Status::Corruption("extended L2 entries need clusters of at least 16 KiB");

  // Table sizes within the format's limits; offsets as QEMU's
  // validate_table_offset() wants them: aligned, and addressable.
  if (uint64_t(h.l1_size) * 8 > kMaxL1Bytes)
    return Status::Corruption(fmt::format("L1 table of {} entries is too large", h.l1_size));
  if (h.l1_size < L1EntriesFor(h.virtual_size, h))
    return Status::Corruption(fmt::format("L1 table of {} entries is too small for virtual size {}",
                                          h.l1_size, h.virtual_size));
  QD_RETURN_IF_ERROR(CheckTableOffset("L1 table", h.l1_offset, uint64_t(h.l1_size) * 8, cs));
  if (uint64_t(h.reftable_clusters) * cs > kMaxRefTableBytes)
    return Status::Corruption(fmt::format("refcount table of {} clusters is too large", h.reftable_clusters));
  QD_RETURN_IF_ERROR(CheckTableOffset("refcount table", h.reftable_offset, uint64_t(h.reftable_clusters) * cs, cs));
  if (h.nb_snapshots > kMaxSnapshots)
    return Status::Corruption(fmt::format("{} snapshots is too many", h.nb_snapshots));
  // QEMU refuses a misaligned snapshot table even when there are no snapshots.
  QD_RETURN_IF_ERROR(CheckTableOffset("snapshot table", h.snapshots_offset, 40ull * h.nb_snapshots, cs));
  return Status::Ok();
}

Status CheckUsable(const Header& h, uint64_t file_size) {
  // The format wants both; QEMU enforces neither.
  if (h.version == 3 && h.header_length % 8 != 0)
    return Status::Corruption(fmt::format("bad header_length {}", h.header_length));
  if (h.repeated_extension)
    return Status::Corruption(fmt::format("header extension {:#010x} appears twice", h.repeated_extension));
  if (h.l1_offset == 0 && h.l1_size > 0) return Status::Corruption("L1 table overlaps the header");
  if (h.reftable_clusters == 0) return Status::Corruption("refcount table is empty");
  if (h.reftable_offset == 0) return Status::Corruption("refcount table overlaps the header");
  if (h.nb_snapshots > 0) {
    if (h.snapshots_offset == 0) return Status::Corruption("snapshot table overlaps the header");
    const uint64_t bytes = 40ull * h.nb_snapshots;
    if (h.snapshots_offset > file_size || bytes > file_size - h.snapshots_offset)
      return Status::Corruption(fmt::format("snapshot table at {:#x} ({} bytes) lies beyond the end of the file",
                                            h.snapshots_offset, bytes));
  }
  return Status::Ok();
}

Result<Header> ParseHeader(std::span<const uint8_t> head, uint64_t file_size) {
  if (file_size < kV2HeaderLength) return Status::Corruption("file too short for a qcow2 header");
  // A header_length that is not a multiple of 8 is named as the problem,
  // before its misaligned extensions fail to decode.
  if (head.size() >= sizeof(RawHeader)) {
    RawHeader raw;
    std::memcpy(&raw, head.data(), sizeof raw);
    if (raw.magic == kQcowMagic && raw.version == 3 && raw.header_length >= 104 && raw.header_length % 8 != 0)
      return Status::Corruption(fmt::format("bad header_length {}", uint32_t(raw.header_length)));
  }
  QD_ASSIGN_OR_RETURN(Header h, DecodeHeader(head));
  QD_RETURN_IF_ERROR(ValidateHeader(h));
  QD_RETURN_IF_ERROR(CheckUsable(h, file_size));
  return h;
}

Result<std::vector<uint8_t>> EncodeHeader(const Header& h) {
  const uint64_t cs = h.cluster_size();
  std::vector<uint8_t> out(sizeof(RawHeader), 0);
  auto put_ext = [&](uint32_t type, std::span<const uint8_t> data) {
    size_t at = out.size();
    out.resize(at + 8 + ((data.size() + 7) & ~size_t(7)), 0);
    reinterpret_cast<be32*>(&out[at])[0] = type;
    reinterpret_cast<be32*>(&out[at + 4])[0] = uint32_t(data.size());
    if (!data.empty()) std::memcpy(&out[at + 8], data.data(), data.size());  // the end marker has no data
  };
  if (h.version == 2) out.resize(kV2HeaderLength);
  else out.resize(h.header_length, 0);
  {  // both versions carry extensions
    if (h.backing_format)
      put_ext(kExtBackingFormat, {reinterpret_cast<const uint8_t*>(h.backing_format->data()),
                                  h.backing_format->size()});
    if (h.dedup) {
      RawDedupExtension raw;
      raw.version = h.dedup->version;
      raw.hash_algorithm = h.dedup->hash_algorithm;
      raw.index_offset = h.dedup->index_offset;
      raw.index_entries = h.dedup->index_entries;
      raw.index_buckets = h.dedup->index_buckets;
      raw.free_hint = h.dedup->free_hint;
      raw.compressed = h.dedup->compressed;
      raw.memory_misses = h.dedup->memory_misses;
      put_ext(kExtDedup, {reinterpret_cast<const uint8_t*>(&raw), sizeof raw});
    }
    if (!h.feature_names.empty()) {
      std::vector<uint8_t> table;
      for (auto& [key, name] : h.feature_names) {
        uint8_t entry[kFeatureNameEntryBytes] = {};
        entry[0] = uint8_t(key.first);
        entry[1] = uint8_t(key.second);
        std::memcpy(entry + 2, name.data(), std::min<size_t>(name.size(), 46));
        table.insert(table.end(), entry, entry + sizeof entry);
      }
      put_ext(kExtFeatureNames, table);
    }
    for (auto& [type, data] : h.other_extensions) {
      // A short dedup extension kept verbatim gives way to the one written
      // above: twice the same type is an image no parser (ours) accepts.
      if (type == kExtDedup && h.dedup) continue;
      put_ext(type, data);
    }
    put_ext(kExtEnd, {});
  }
  uint64_t backing_offset = 0;
  if (!h.backing_file.empty()) {
    if (h.backing_file.size() > kMaxBackingNameBytes)
      return Status::InvalidArgument("backing file name is longer than 1023 bytes");
    backing_offset = out.size();
    out.insert(out.end(), h.backing_file.begin(), h.backing_file.end());
  }
  if (out.size() > cs) return Status::InvalidArgument("header and extensions do not fit in one cluster");

  RawHeader raw;
  std::memset(static_cast<void*>(&raw), 0, sizeof raw);  // bytes of big-endian fields: all zero is valid
  raw.magic = kQcowMagic;
  raw.version = h.version;
  raw.backing_file_offset = backing_offset;
  raw.backing_file_size = uint32_t(h.backing_file.size());
  raw.cluster_bits = h.cluster_bits;
  raw.size = h.virtual_size;
  raw.crypt_method = h.crypt_method;
  raw.l1_size = h.l1_size;
  raw.l1_table_offset = h.l1_offset;
  raw.refcount_table_offset = h.reftable_offset;
  raw.refcount_table_clusters = h.reftable_clusters;
  raw.nb_snapshots = h.nb_snapshots;
  raw.snapshots_offset = h.snapshots_offset;
  raw.incompatible_features = h.incompatible;
  raw.compatible_features = h.compatible;
  raw.autoclear_features = h.autoclear;
  raw.refcount_order = h.refcount_order;
  raw.header_length = h.header_length;
  raw.compression_type = uint8_t(h.compression);
  std::memcpy(out.data(), &raw, h.version == 2 ? kV2HeaderLength : std::min<size_t>(h.header_length, sizeof raw));
  if (h.version == 3 && h.header_length > sizeof raw && !h.header_tail.empty())
    std::memcpy(out.data() + sizeof raw, h.header_tail.data(),
                std::min<size_t>(h.header_tail.size(), h.header_length - sizeof raw));
  return out;
}

}  // namespace qcow2dedup
