#include "check/fresh_clusters.h"

namespace qcow2dedup::check {

Result<uint64_t> FreshClusters::Take(uint64_t n) {
  for (;;) {
    const uint64_t start = next_;
    uint64_t k = 0;
    while (k < n && Usable(start + k)) ++k;
    if (k < n) {
      next_ = start + k + 1;
      continue;
    }
    for (uint64_t c = start; c < start + n; ++c) {
      auto offset = stored_.BlockOffset(c / stored_.per_block());
      if (*offset != 0 && *offset < ctx_.file_size) QD_RETURN_IF_ERROR(stored_.Set(c, 1));
    }
    next_ = start + n;
    return start;
  }
}

bool FreshClusters::Usable(uint64_t c) {
  auto offset = stored_.BlockOffset(c / stored_.per_block());
  auto rc = stored_.Get(c);
  // Not the block itself, nor a leaked cluster (another pass decides about those).
  return offset.ok() && rc.ok() && *offset != c * ctx_.cs() && *rc == 0;
}

}  // namespace qcow2dedup::check
