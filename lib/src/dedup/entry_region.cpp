#include "dedup/entry_region.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <new>
#include <utility>

namespace qcow2dedup {

namespace {
uint64_t PageBytes() {
  static const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  return page;
}
uint64_t PageUp(uint64_t bytes) { return (bytes + PageBytes() - 1) / PageBytes() * PageBytes(); }
}  // namespace

void EntryRegion::Swap(EntryRegion& o) {
  std::swap(base_, o.base_);
  std::swap(capacity_, o.capacity_);
  std::swap(top_, o.top_);
}

uint64_t EntryRegion::Take(uint64_t n) {
  if (top_ + n > capacity_) {
    // Half again each time: the mapping moves rarely, and pages are only
    // touched as they are used.
    const uint64_t want = PageUp(std::max({top_ + n, capacity_ + capacity_ / 2, uint64_t(8192)}) * sizeof(uint64_t));
    void* p = base_ ? ::mremap(base_, capacity_ * sizeof(uint64_t), want, MREMAP_MAYMOVE)
                    : ::mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<uint64_t*>(p);
    capacity_ = want / sizeof(uint64_t);
  }
  const uint64_t at = top_;
  top_ += n;
  return at;
}

void EntryRegion::Lower(uint64_t top) {
  const uint64_t from = PageUp(top * sizeof(uint64_t)), to = PageUp(top_ * sizeof(uint64_t));
  if (to > from) ::madvise(reinterpret_cast<char*>(base_) + from, to - from, MADV_DONTNEED);
  top_ = std::min(top, top_);
}

void EntryRegion::Clear() {
  if (base_) ::munmap(base_, capacity_ * sizeof(uint64_t));
  base_ = nullptr;
  capacity_ = top_ = 0;
}

}  // namespace qcow2dedup
