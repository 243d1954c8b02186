// Whether this build runs under AddressSanitizer (-DQCOW2DEDUP_SANITIZE=ON or
// the fuzz build). Tests and the binary they spawn share the build flags, so
// a test compiled with ASan knows the tool is ASan-built too.
//
// Under ASan `ulimit -v` cannot bound memory: the runtime reserves terabytes
// of address space for its shadow at start and dies at once under any
// sensible limit. Tests that cap memory use kMemoryLimitPrefix instead,
// which caps every single allocation with ASan's max_allocation_size_mb (a
// larger one is reported as an error, a stricter judge than ulimit's
// std::bad_alloc).
#pragma once

#include <string>

namespace testing {

#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif
#else
inline constexpr bool kAddressSanitizer = false;
#endif

// A shell prefix that bounds the memory of the command after it to about
// kib KiB: `ulimit -v` in a plain build, ASan's allocation cap in an ASan one.
inline std::string MemoryLimitPrefix(unsigned long long kib) {
  if (!kAddressSanitizer) return "ulimit -v " + std::to_string(kib) + "; ";
  return "export ASAN_OPTIONS=\"${ASAN_OPTIONS:+$ASAN_OPTIONS:}max_allocation_size_mb=" +
         std::to_string(kib / 1024) + "\"; ";
}

}  // namespace testing
