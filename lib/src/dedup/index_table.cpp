#include "dedup/index_table.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <map>

#include "dedup/sha256.h"
#include "format/endian.h"

namespace qcow2dedup {

namespace {

#pragma pack(push, 1)
struct RawIndexEntry {
  uint8_t fingerprint[5];  // big-endian
  be32 cluster;
};
struct RawIndexBucket {
  be16 count;
  uint8_t overflowed;
  uint8_t zero[5];
  uint8_t check[8];
  RawIndexEntry entries[kIndexBucketEntries];
  uint8_t unused[4096 - 16 - kIndexBucketEntries * kIndexEntryBytes];
};
#pragma pack(pop)
static_assert(sizeof(RawIndexEntry) == kIndexEntryBytes && sizeof(RawIndexBucket) == kIndexBucketBytes);

// Buckets go to and from the file this many at a time when a table is
// written or read whole.
constexpr uint64_t kPieceBuckets = 256;
constexpr size_t kMaxCachedBuckets = 1024;

uint64_t BucketCheck(const RawIndexBucket& bucket) {
  RawIndexBucket copy = bucket;
  std::memset(copy.check, 0, sizeof copy.check);
  const Digest d = Sha256({reinterpret_cast<const uint8_t*>(&copy), sizeof copy});
  return LoadBe64(d.data());
}

void StoreFingerprint(uint8_t* out, Fingerprint f) {
  for (int i = 4; i >= 0; --i, f >>= 8) out[i] = uint8_t(f);
}
Fingerprint LoadFingerprint(const uint8_t* in) {
  Fingerprint f = 0;
  for (int i = 0; i < 5; ++i) f = f << 8 | in[i];
  return f;
}
static_assert(kFingerprintBits == 40);

}  // namespace

uint64_t IndexBucketsFor(uint64_t entries) {
  return std::bit_ceil(std::max<uint64_t>(1, (entries + kIndexBuildLoad - 1) / kIndexBuildLoad));
}

uint64_t HomeBucket(Fingerprint f, uint64_t buckets) {
  // buckets is a power of two: its top bits, so that fingerprint order is bucket order.
  const int bits = std::countr_zero(buckets);
  return bits <= int(kFingerprintBits) ? f >> (kFingerprintBits - bits) : f << (bits - kFingerprintBits);
}

void EncodeIndexBucket(const IndexBucket& b, uint8_t* out) {
  RawIndexBucket raw;
  std::memset(static_cast<void*>(&raw), 0, sizeof raw);
  if (!b.entries.empty() || b.overflowed) {  // else empty: all zero
    raw.count = uint16_t(b.entries.size());
    raw.overflowed = b.overflowed;
    for (size_t i = 0; i < b.entries.size(); ++i) {
      StoreFingerprint(raw.entries[i].fingerprint, b.entries[i].fingerprint);
      raw.entries[i].cluster = b.entries[i].cluster;
    }
    StoreBe64(raw.check, BucketCheck(raw));
  }
  std::memcpy(out, &raw, sizeof raw);
}

IndexBucket DecodeIndexBucket(const uint8_t* in) {
  IndexBucket b;
  RawIndexBucket raw;
  std::memcpy(static_cast<void*>(&raw), in, sizeof raw);
  if (raw.count == 0 && raw.overflowed == 0 && IsAllZero({in, kIndexBucketBytes})) return b;
  if (raw.count > kIndexBucketEntries || raw.overflowed > 1 || LoadBe64(raw.check) != BucketCheck(raw)) {
    b.ok = false;
    return b;
  }
  b.overflowed = raw.overflowed;
  b.entries.resize(raw.count);
  for (size_t i = 0; i < b.entries.size(); ++i) {
    b.entries[i].fingerprint = LoadFingerprint(raw.entries[i].fingerprint);
    b.entries[i].cluster = raw.entries[i].cluster;
    // Never written: cluster 0 is the header, and the last number is none.
    if (b.entries[i].cluster == 0 || b.entries[i].cluster > DedupIndex::kMaxCluster) return IndexBucket{false, false, {}};
  }
  return b;
}

Status CheckIndexPlacement(const DedupExtension& ext, uint64_t cs, uint64_t file_size) {
  if (ext.version != kDedupExtensionVersion)
    return Status::Unsupported(fmt::format("index format version {} is not read", ext.version));
  if (ext.hash_algorithm != kHashSha256)
    return Status::Unsupported(fmt::format("unknown hash algorithm {}", ext.hash_algorithm));
  if (ext.index_offset == 0)
    return ext.index_entries == 0 && ext.index_buckets == 0 ? Status::Ok()
                                                             : Status::Corruption("entries without a table");
  if (!std::has_single_bit(ext.index_buckets) || ext.index_buckets > file_size / kIndexBucketBytes ||
      ext.index_entries > ext.index_buckets * kIndexBucketEntries || ext.index_offset % cs != 0 ||
      ext.index_offset < cs || ext.index_offset > file_size ||
      IndexTableBytes(ext.index_buckets) > file_size - ext.index_offset)
    return Status::Corruption(fmt::format(
        "the index table at {:#x} ({}) does not fit in the file", ext.index_offset,
        ext.index_buckets < (1ull << 52) ? fmt::format("{} bytes", ext.index_buckets * kIndexBucketBytes)
                                         : fmt::format("{} buckets", ext.index_buckets)));
  return Status::Ok();
}

IndexTable::IndexTable(File* file, const DedupExtension& ext)
    : file_(file), offset_(ext.index_offset), buckets_(ext.index_buckets), entries_(ext.index_entries) {}

Result<const IndexBucket*> IndexTable::Bucket(uint64_t b) {
  if (auto it = read_.find(b); it != read_.end()) return &it->second;
  if (read_.size() >= kMaxCachedBuckets) read_.clear();
  uint8_t raw[kIndexBucketBytes];
  QD_RETURN_IF_ERROR(file_->ReadAt(offset_ + b * kIndexBucketBytes, raw));
  IndexBucket decoded = DecodeIndexBucket(raw);
  if (!decoded.ok) damaged_ = true;
  return &read_.emplace(b, std::move(decoded)).first->second;
}

Status IndexTable::ForKey(Fingerprint key, const std::function<bool(uint64_t)>& f) {
  if (buckets_ == 0) return Status::Ok();
  uint64_t b = HomeBucket(key, buckets_);
  for (uint64_t probes = 0; probes < buckets_; ++probes, b = (b + 1) & (buckets_ - 1)) {
    QD_ASSIGN_OR_RETURN(const IndexBucket* bucket, Bucket(b));
    for (const IndexEntry& e : bucket->entries)
      if (e.fingerprint == key && !f(e.cluster)) return Status::Ok();
    if (!bucket->overflowed) break;
  }
  return Status::Ok();
}

Status IndexTable::Apply(const std::vector<Pair>& removed, const std::vector<Pair>& added, const MayWrite& may_write) {
  if (buckets_ == 0 || entries_ + added.size() > buckets_ * kIndexMaxLoad + removed.size())
    return Status::Unsupported("the index table is too full");
  // Changed buckets, by number, so each is written once and in order.
  std::map<uint64_t, IndexBucket> changed;
  auto get = [&](uint64_t b) -> Result<IndexBucket*> {
    if (auto it = changed.find(b); it != changed.end()) return &it->second;
    QD_ASSIGN_OR_RETURN(const IndexBucket* read, Bucket(b));
    if (!read->ok) return Status::Corruption(fmt::format("index bucket {} is damaged", b));
    return &changed.emplace(b, *read).first->second;
  };
  uint64_t entries = entries_;
  for (const Pair& p : removed) {
    uint64_t b = HomeBucket(p.fingerprint, buckets_);
    for (uint64_t probes = 0; probes < buckets_; ++probes, b = (b + 1) & (buckets_ - 1)) {
      QD_ASSIGN_OR_RETURN(IndexBucket * bucket, get(b));
      auto it = std::find_if(bucket->entries.begin(), bucket->entries.end(),
                             [&](const IndexEntry& e) { return e.cluster == p.cluster && e.fingerprint == p.fingerprint; });
      if (it != bucket->entries.end()) {
        *it = bucket->entries.back();
        bucket->entries.pop_back();
        --entries;
        break;
      }
      if (!bucket->overflowed) return Status::Corruption("a removed index entry is not in the table");
    }
  }
  for (const Pair& p : added) {
    if (p.cluster > DedupIndex::kMaxCluster) continue;
    uint64_t b = HomeBucket(p.fingerprint, buckets_);
    for (uint64_t probes = 0;; ++probes, b = (b + 1) & (buckets_ - 1)) {
      if (probes == buckets_) return Status::Unsupported("the index table is full");
      QD_ASSIGN_OR_RETURN(IndexBucket * bucket, get(b));
      if (bucket->entries.size() < kIndexBucketEntries) {
        IndexEntry e{p.fingerprint, uint32_t(p.cluster)};
        bucket->entries.push_back(e);
        ++entries;
        break;
      }
      bucket->overflowed = true;
    }
  }
  for (auto& [b, bucket] : changed) QD_RETURN_IF_ERROR(may_write(offset_ + b * kIndexBucketBytes, kIndexBucketBytes));
  uint8_t raw[kIndexBucketBytes];
  for (auto& [b, bucket] : changed) {
    EncodeIndexBucket(bucket, raw);
    QD_RETURN_IF_ERROR(file_->WriteAt(offset_ + b * kIndexBucketBytes, raw));
    read_[b] = std::move(bucket);
  }
  entries_ = entries;
  return Status::Ok();
}

Status IndexTable::ForEach(const std::function<void(Fingerprint, uint64_t)>& f) {
  std::vector<uint8_t> piece;
  for (uint64_t b = 0; b < buckets_; b += kPieceBuckets) {
    const uint64_t n = std::min(kPieceBuckets, buckets_ - b);
    piece.resize(n * kIndexBucketBytes);
    QD_RETURN_IF_ERROR(file_->ReadAt(offset_ + b * kIndexBucketBytes, piece));
    for (uint64_t i = 0; i < n; ++i) {
      IndexBucket bucket = DecodeIndexBucket(&piece[i * kIndexBucketBytes]);
      if (!bucket.ok) damaged_ = true;
      for (const IndexEntry& e : bucket.entries) f(e.fingerprint, e.cluster);
    }
  }
  return Status::Ok();
}

namespace {

// Writes index as a table of buckets at offset, in one pass over the
// entries (in fingerprint order, so in home bucket order); false if the
// last bucket would overflow (its entries would wrap around to the first
// ones).
Result<bool> WriteBuckets(File& file, const DedupIndex& index, uint64_t offset, uint64_t buckets) {
  std::vector<IndexEntry> pending;  // home reached, no room yet: overflow forward
  std::vector<uint8_t> raw;
  uint64_t next = 0;  // the bucket being filled
  Status st;
  auto emit = [&](uint64_t upto) {  // fills and writes buckets [next, upto)
    for (; next < upto && st.ok(); ++next) {
      IndexBucket b;
      const size_t take = std::min<size_t>(pending.size(), kIndexBucketEntries);
      b.entries.assign(pending.begin(), pending.begin() + take);
      pending.erase(pending.begin(), pending.begin() + take);
      b.overflowed = !pending.empty();
      raw.resize(raw.size() + kIndexBucketBytes);
      EncodeIndexBucket(b, &raw[raw.size() - kIndexBucketBytes]);
      if (raw.size() == kPieceBuckets * kIndexBucketBytes || next + 1 == buckets) {
        st = file.WriteAt(offset + (next + 1) * kIndexBucketBytes - raw.size(), raw);
        raw.clear();
      }
    }
  };
  index.ForEach([&](Fingerprint key, uint64_t cluster) {
    emit(HomeBucket(key, buckets));
    pending.push_back({key, uint32_t(cluster)});
  });
  emit(buckets);
  QD_RETURN_IF_ERROR(st);
  return pending.empty();
}

}  // namespace

uint64_t IndexTableBuckets(const DedupIndex& index) {
  if (index.size() == 0) return 0;
  // At half load the last bucket all but never overflows (its entries would
  // wrap around to the first ones); where it would, twice the buckets.
  for (uint64_t buckets = IndexBucketsFor(index.size());; buckets *= 2) {
    std::vector<uint32_t> homes(buckets);
    index.ForEach([&](Fingerprint key, uint64_t) { ++homes[HomeBucket(key, buckets)]; });
    uint64_t carry = 0;
    for (uint32_t n : homes) carry = carry + n > kIndexBucketEntries ? carry + n - kIndexBucketEntries : 0;
    if (carry == 0) return buckets;
  }
}

Result<DedupExtension> WriteIndexTable(File& file, const DedupIndex& index, uint64_t offset) {
  DedupExtension ext;
  if (index.size() == 0) return ext;
  ext.index_buckets = IndexTableBuckets(index);
  QD_ASSIGN_OR_RETURN(bool fits, WriteBuckets(file, index, offset, ext.index_buckets));
  if (!fits) return Status::Corruption("the index table overflowed its last bucket");  // IndexTableBuckets said it would not
  ext.index_offset = offset;
  ext.index_entries = index.size();
  return ext;
}

Result<bool> ReadIndexTable(File& file, const Header& h, uint64_t file_size, DedupIndex& index) {
  index.Clear();
  if (!h.dedup_in_sync() || !CheckIndexPlacement(*h.dedup, h.cluster_size(), file_size).ok()) return false;
  IndexTable table(&file, *h.dedup);
  uint64_t seen = 0;
  QD_RETURN_IF_ERROR(table.ForEach([&](Fingerprint key, uint64_t cluster) {
    index.Insert(key, cluster);
    ++seen;
  }));
  if (table.damaged() || seen != h.dedup->index_entries) {
    index.Clear();
    return false;
  }
  return true;
}

}  // namespace qcow2dedup
