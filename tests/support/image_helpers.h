// Small helpers the tests share: reproducible data, and opening an image
// for writing where failing to open ends the test.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "qcow2dedup/image.h"

namespace testing {

// n bytes of seed's random stream (a byte per draw).
inline std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = uint8_t(rng());
  return v;
}

inline std::unique_ptr<qcow2dedup::Image> OpenWritable(const std::string& path, bool verify = false) {
  qcow2dedup::OpenOptions o;
  o.writable = true;
  o.verify = verify;
  auto img = qcow2dedup::Image::Open(path, std::move(o));
  REQUIRE_MESSAGE(img.ok(), img.status().message());
  return std::move(img).value();
}

}  // namespace testing
