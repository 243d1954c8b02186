// Free clusters for what repair must write anew (moved guest data, a new
// snapshot table): past every reference, with refcount 0 (the dedup index
// may lie there: repair rebuilds it anyway), and where a refcount block
// exists their refcount is set at once. Without a block it stays 0 and the
// pass that follows rebuilds the refcount structure.
#pragma once

#include <cstdint>

#include "check/context.h"
#include "check/stored_refcounts.h"

namespace qcow2dedup::check {

class FreshClusters {
 public:
  FreshClusters(Context& ctx, StoredRefcounts& stored, uint64_t start) : ctx_(ctx), stored_(stored), next_(start) {}

  // n contiguous clusters (a compressed cluster may span more than one).
  Result<uint64_t> Take(uint64_t n);

 private:
  bool Usable(uint64_t c);

  Context& ctx_;
  StoredRefcounts& stored_;
  uint64_t next_;
};

}  // namespace qcow2dedup::check
