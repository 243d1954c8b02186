// Memory for the dedup index's entries: one mapping, handed out from its
// top, grown in place by the kernel (mremap), its pages above the top given
// back when the top comes down. The index compacts it itself (it knows
// where every shard lies), so what the process holds is what the index
// uses: shards that grow in step would leave the C heap full of holes.
#pragma once

#include <cstdint>

namespace qcow2dedup {

class EntryRegion {
 public:
  EntryRegion() = default;
  EntryRegion(const EntryRegion&) = delete;
  EntryRegion& operator=(const EntryRegion&) = delete;
  ~EntryRegion() { Clear(); }
  void Swap(EntryRegion& o);

  uint64_t* data() const { return base_; }
  uint64_t top() const { return top_; }
  // n more entries at the top: where they start. May move data().
  uint64_t Take(uint64_t n);
  // Moves the top down to top (the entries above are no longer used) and
  // gives their pages back.
  void Lower(uint64_t top);
  void Clear();

 private:
  uint64_t* base_ = nullptr;
  uint64_t capacity_ = 0;  // entries mapped
  uint64_t top_ = 0;
};

}  // namespace qcow2dedup
