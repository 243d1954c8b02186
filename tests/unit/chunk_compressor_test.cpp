// image/chunk_compressor: convert -c's compression on the workers. Every
// data cluster is marked to be stored compressed; only the first cluster of
// each distinct data (across chunks) is compressed; what saves less than a
// sector is marked to be stored as it is; zeros are left alone.
#include "image/chunk_compressor.h"

#include <doctest/doctest.h>

#include <random>
#include <thread>

#include "format/compression.h"

using namespace qcow2dedup;

namespace {

constexpr uint64_t kCs = 4096;
using Bytes = std::vector<uint8_t>;

Bytes Text(uint32_t seed) {
  Bytes b(kCs);
  for (size_t i = 0; i < kCs; ++i) b[i] = uint8_t('a' + (i * 7 + seed) % 13);
  b[0] = uint8_t(seed);
  return b;
}

Bytes Noise(uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes b(kCs);
  for (auto& c : b) c = uint8_t(rng());
  return b;
}

ClusterWrite Prepared(uint64_t g, const Bytes& data) {
  ClusterWrite w{g, data, false, {}};
  PrepareClusterWrite(w);
  return w;
}

}  // namespace

TEST_CASE("only the first copy of each data is compressed, across chunks; the bytes decompress to it") {
  ChunkCompressor c(CompressionType::kDeflate, kCs);
  const Bytes a = Text(1), b = Text(2), zero(kCs, 0);
  std::vector<ClusterWrite> one = {Prepared(0, a), Prepared(1, a), Prepared(2, zero), Prepared(3, b)};
  Bytes out1;
  c.Run(one, out1);
  CHECK(one[0].compress);
  CHECK_FALSE(one[0].compressed.empty());
  CHECK(one[1].compress);  // a duplicate: stored compressed if ever stored, but not compressed here
  CHECK(one[1].compressed.empty());
  CHECK_FALSE(one[2].compress);  // zeros are not stored at all
  CHECK_FALSE(one[3].compressed.empty());
  Bytes back(kCs);
  REQUIRE(Decompress(CompressionType::kDeflate, one[0].compressed, back).ok());
  CHECK(back == a);
  REQUIRE(Decompress(CompressionType::kDeflate, one[3].compressed, back).ok());
  CHECK(back == b);
  // A later chunk: a and b were seen already.
  const Bytes c3 = Text(3);
  std::vector<ClusterWrite> two = {Prepared(4, b), Prepared(5, a), Prepared(6, c3)};
  Bytes out2;
  c.Run(two, out2);
  CHECK(two[0].compressed.empty());
  CHECK(two[1].compressed.empty());
  CHECK_FALSE(two[2].compressed.empty());
  for (const ClusterWrite& w : two) CHECK(w.compress);
}

TEST_CASE("data that does not save a sector is stored as it is") {
  ChunkCompressor c(CompressionType::kZstd, kCs);
  const Bytes noise = Noise(5), text = Text(4);  // the writes point into them
  std::vector<ClusterWrite> w = {Prepared(0, noise), Prepared(1, text)};
  Bytes out;
  c.Run(w, out);
  CHECK_FALSE(w[0].compress);
  CHECK(w[0].compressed.empty());
  CHECK(w[1].compress);
  REQUIRE_FALSE(w[1].compressed.empty());
  CHECK(WorthCompressing(w[1].compressed.size(), kCs));
}

TEST_CASE("chunks compressed on several threads at once claim each data once") {
  ChunkCompressor c(CompressionType::kDeflate, kCs);
  std::vector<Bytes> data;
  for (uint32_t i = 0; i < 64; ++i) data.push_back(Text(i));
  std::vector<std::vector<ClusterWrite>> chunks(4);
  std::vector<Bytes> outs(4);
  for (size_t t = 0; t < 4; ++t)
    for (size_t i = 0; i < data.size(); ++i) chunks[t].push_back(Prepared(t * 100 + i, data[i]));
  std::vector<std::thread> threads;
  for (size_t t = 0; t < 4; ++t) threads.emplace_back([&, t] { c.Run(chunks[t], outs[t]); });
  for (auto& th : threads) th.join();
  for (size_t i = 0; i < data.size(); ++i) {
    int compressed = 0;
    for (size_t t = 0; t < 4; ++t) compressed += !chunks[t][i].compressed.empty();
    CHECK(compressed == 1);
  }
}
