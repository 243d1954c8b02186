// Where compressed clusters go: byte after byte, as QEMU packs them
// (qcow2_alloc_bytes). A fragment goes into the rest of the cluster the last
// one ended in if it fits; otherwise a fresh cluster is taken, and the
// fragment straddles into it when the allocator hands out the adjacent
// cluster, or starts at its beginning when not (the old tail stays unused).
//
// Every host cluster a fragment touches gets one reference for it, which is
// how qemu-img check counts a compressed L2 entry; a fresh cluster comes
// with its first reference from the allocator.
#pragma once

#include <cstdint>
#include <functional>

#include "qcow2dedup/status.h"

namespace qcow2dedup {

class CompressedPacker {
 public:
  struct Hooks {
    // A free cluster, its refcount set to 1; returns its host offset.
    std::function<Result<uint64_t>()> allocate;
    // Whether the cluster (by number) still holds our fragments and may take
    // one more reference (false: in use by nothing, or at the share limit).
    std::function<Result<bool>(uint64_t)> can_extend;
    // One more reference to a cluster (by number).
    std::function<Status(uint64_t)> add_reference;
  };

  explicit CompressedPacker(uint64_t cluster_size) : cs_(cluster_size) {}

  // The host byte offset for a fragment of bytes (< one cluster).
  Result<uint64_t> Place(uint64_t bytes, const Hooks& hooks) {
    uint64_t at = next_;
    if (at) {
      QD_ASSIGN_OR_RETURN(bool ok, hooks.can_extend(at / cs_));
      if (!ok) at = 0;
    }
    uint64_t fresh = 0;  // a cluster number > 0 (cluster 0 is the header)
    if (!at || cs_ - at % cs_ < bytes) {
      QD_ASSIGN_OR_RETURN(uint64_t c, hooks.allocate());
      if (!at || c != (at / cs_ + 1) * cs_) at = c;
      fresh = c / cs_;
    }
    for (uint64_t c = at / cs_; c <= (at + bytes - 1) / cs_; ++c)
      if (c != fresh) QD_RETURN_IF_ERROR(hooks.add_reference(c));
    next_ = (at + bytes) % cs_ ? at + bytes : 0;
    return at;
  }

  // The cluster lost its last reference: nothing more goes into it (it may
  // be handed out for something else once freed).
  void Forget(uint64_t cluster) {
    if (next_ && next_ / cs_ == cluster) next_ = 0;
  }
  // After an error nothing is known about where the last fragment went.
  void Reset() { next_ = 0; }

 private:
  uint64_t cs_;
  uint64_t next_ = 0;  // where the next fragment would go; 0: nowhere yet
};

}  // namespace qcow2dedup
