// Compressed clusters the writer may link new duplicates to: the digest of
// each one's uncompressed data -> its descriptor (the L2 entry as QEMU
// writes it, without COPIED), and how many L2 entries of the active L1 use
// that descriptor. The host clusters' refcounts cannot tell when a fragment
// dies (several fragments share a cluster, and a fragment may straddle
// two), so the writer counts the entries itself.
//
// Kept in memory only: the write session builds it from the L2 tables when
// it starts, decompressing and hashing each descriptor once, so it always
// rests on what the image holds (advisory data that is never wrong).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <unordered_map>

#include "dedup/sha256.h"

namespace qcow2dedup {

class CompressedIndex {
 public:
  // The descriptor holding data with this digest (the full SHA-256), if a
  // live one is known.
  std::optional<uint64_t> Find(const Digest& d) const {
    auto it = by_digest_.find(d);
    if (it == by_digest_.end()) return std::nullopt;
    return it->second;
  }

  // One more L2 entry uses descriptor. digest, when given, is what it
  // holds (a fresh copy, or one hashed when the session started).
  void AddReference(uint64_t descriptor, const Digest* digest = nullptr) {
    Fragment& f = fragments_[descriptor];
    ++f.refs;
    if (digest && !f.hashed) SetDigest(descriptor, *digest);
  }
  // Sets what descriptor holds (the latest copy of the data is the one found).
  void SetDigest(uint64_t descriptor, const Digest& digest) {
    auto it = fragments_.find(descriptor);
    if (it == fragments_.end()) return;
    it->second.digest = digest;
    it->second.hashed = true;
    by_digest_[digest] = descriptor;
  }
  // One L2 entry fewer uses descriptor; at none it is forgotten. Returns the
  // references left.
  uint64_t DropReference(uint64_t descriptor) {
    auto it = fragments_.find(descriptor);
    if (it == fragments_.end()) return 0;
    if (--it->second.refs > 0) return it->second.refs;
    if (it->second.hashed) {
      auto d = by_digest_.find(it->second.digest);
      if (d != by_digest_.end() && d->second == descriptor) by_digest_.erase(d);
    }
    fragments_.erase(it);
    return 0;
  }
  uint64_t References(uint64_t descriptor) const {
    auto it = fragments_.find(descriptor);
    return it == fragments_.end() ? 0 : it->second.refs;
  }
  // The descriptors known, for hashing them.
  template <typename Fn>
  void ForEachDescriptor(Fn&& fn) const {
    for (const auto& [d, f] : fragments_) fn(d);
  }
  // fn(descriptor, digest) for each descriptor whose data is known.
  template <typename Fn>
  void ForEachHashed(Fn&& fn) const {
    for (const auto& [d, f] : fragments_)
      if (f.hashed) fn(d, f.digest);
  }
  size_t size() const { return fragments_.size(); }
  void Clear() {
    fragments_.clear();
    by_digest_.clear();
  }

 private:
  struct Fragment {
    uint64_t refs = 0;
    bool hashed = false;
    Digest digest{};
  };

 public:
  struct DigestHash {
    size_t operator()(const Digest& d) const {
      size_t h;
      std::memcpy(&h, d.data(), sizeof h);
      return h;
    }
  };

 private:
  std::unordered_map<uint64_t, Fragment> fragments_;
  std::unordered_map<Digest, uint64_t, DigestHash> by_digest_;
};

}  // namespace qcow2dedup
