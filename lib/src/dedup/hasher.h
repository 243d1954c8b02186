// Hashing spread over the machine's cores.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <thread>
#include <vector>

namespace qcow2dedup {

inline unsigned HashThreads() { return std::max(1u, std::min(8u, std::thread::hardware_concurrency())); }

// Runs fn(i) for i in [0, n), split into contiguous parts over the cores.
// Small jobs stay on the calling thread.
inline void ParallelFor(size_t n, size_t min_per_thread, const std::function<void(size_t)>& fn) {
  unsigned threads = std::min<size_t>(HashThreads(), std::max<size_t>(1, n / std::max<size_t>(min_per_thread, 1)));
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  size_t per = (n + threads - 1) / threads;
  for (unsigned t = 1; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (size_t i = t * per; i < std::min(n, (t + 1) * per); ++i) fn(i);
    });
  for (size_t i = 0; i < std::min(n, per); ++i) fn(i);
  for (auto& th : pool) th.join();
}

}  // namespace qcow2dedup
