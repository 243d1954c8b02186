// dedup/hash_compressed: every descriptor handed on once, with the digest of
// the cluster its bytes decompress to, or kCorruption when they do not make
// one whole cluster (garbage, a short stream, bytes past the end of the
// file); a failed read is not called corruption. Fragments packed back to
// back are read many at a time.
#include "dedup/hash_compressed.h"

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <random>

#include "format/compression.h"
#include "format/entries.h"
#include "support/memory_file.h"

using namespace qcow2dedup;

namespace {

using Bytes = std::vector<uint8_t>;

Bytes Text(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s;
  while (s.size() < n) s += fmt::format("cluster {} word {} ", seed, rng() % 1000);
  return Bytes(s.begin(), s.begin() + ptrdiff_t(n));
}

// Counts reads, and fails those that touch [bad_begin, bad_end).
class CountingFile final : public File {
 public:
  explicit CountingFile(Bytes bytes) : mem_(std::move(bytes)) {}
  Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override {
    ++reads;
    if (offset < bad_end && offset + buf.size() > bad_begin) return Status::IOError("injected read error");
    return mem_.ReadAt(offset, buf);
  }
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override { return mem_.WriteAt(offset, data); }
  Status Sync() override { return Status::Ok(); }
  Result<uint64_t> Size() override { return mem_.Size(); }
  Status Truncate(uint64_t size) override { return mem_.Truncate(size); }
  Status Lock(LockMode) override { return Status::Ok(); }
  const std::string& name() const override { return name_; }
  std::atomic<uint64_t> reads{0};
  uint64_t bad_begin = 0, bad_end = 0;

 private:
  testing::MemoryFile mem_;
  std::string name_ = "counting";
};

// An image body: fragments packed byte after byte as QEMU packs them, with
// a plain cluster of noise now and then between them.
struct Packed {
  Bytes file;
  std::vector<uint64_t> descriptors;
  std::map<uint64_t, Digest> want;  // descriptor -> digest of its cluster
};

Packed Pack(const Header& h, size_t n) {
  const uint64_t cs = h.cluster_size();
  Packed p;
  p.file.resize(cs);  // cluster 0: the header's place
  std::mt19937 rng(7);
  Bytes out(cs);
  for (size_t i = 0; i < n; ++i) {
    if (i % 50 == 49) {
      Bytes noise(cs);
      for (auto& b : noise) b = uint8_t(rng());
      p.file.insert(p.file.end(), noise.begin(), noise.end());
    }
    const Bytes data = Text(cs, uint32_t(i));
    const size_t len = Compress(h.compression, data, out);
    REQUIRE(WorthCompressing(len, cs));
    const uint64_t at = p.file.size();
    p.file.insert(p.file.end(), out.begin(), out.begin() + ptrdiff_t(len));
    const uint64_t d = EncodeCompressed(at, len, h.cluster_bits);
    p.descriptors.push_back(d);
    p.want[d] = Sha256(data);
  }
  p.file.resize((p.file.size() + 511) / 512 * 512);  // the last sector is whole
  std::shuffle(p.descriptors.begin(), p.descriptors.end(), rng);
  return p;
}

struct Outcome {
  std::map<uint64_t, Digest> digests;
  std::map<uint64_t, Status> errors;
  size_t calls = 0;
  std::vector<uint64_t> offsets;  // in the order handed on
};

Outcome HashAll(File& file, const Header& h, const std::vector<uint64_t>& descriptors) {
  Outcome o;
  uint64_t last_done = 0;
  const uint64_t size = file.Size().value();
  REQUIRE(HashCompressedClusters(file, size, h, descriptors, [&](uint64_t done, uint64_t) { last_done = done; },
                                 [&](uint64_t d, const Result<Digest>& r) {
                                   ++o.calls;
                                   o.offsets.push_back(DecodeCompressed(d, h.cluster_bits).offset);
                                   if (r.ok()) o.digests[d] = r.value();
                                   else o.errors.emplace(d, r.status());
                                 })
              .ok());
  CHECK(last_done == descriptors.size());
  return o;
}

Header MakeHeader(uint32_t bits, CompressionType type) {
  Header h;
  h.cluster_bits = bits;
  h.compression = type;
  return h;
}

}  // namespace

TEST_CASE("every fragment hashed as its uncompressed cluster, read many at a time") {
  for (CompressionType type : {CompressionType::kDeflate, CompressionType::kZstd})
    for (uint32_t bits : {12u, 16u}) {
      const int t = int(type);
      CAPTURE(t);
      CAPTURE(bits);
      const Header h = MakeHeader(bits, type);
      // Enough fragments for several reads of 1 MiB.
      const size_t n = bits == 12 ? 3000 : 300;
      const Packed p = Pack(h, n);
      CountingFile file(p.file);
      const Outcome o = HashAll(file, h, p.descriptors);
      CHECK(o.calls == n);
      CHECK(o.errors.empty());
      CHECK(o.digests == p.want);
      CHECK(std::is_sorted(o.offsets.begin(), o.offsets.end()));
      // One read per MiB or so, not one per fragment.
      const uint64_t mib = p.file.size() >> 20;
      CHECK(file.reads.load() >= 1);
      CHECK(file.reads.load() <= mib + 2);
      CHECK(file.reads.load() * 10 < n);
    }
}

TEST_CASE("a fragment that is not one whole cluster is corruption; its neighbours are unharmed") {
  for (CompressionType type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    const int t = int(type);
    CAPTURE(t);
    const Header h = MakeHeader(16, type);
    const uint64_t cs = h.cluster_size();
    Packed p = Pack(h, 20);
    // Garbage over one fragment's first bytes (an invalid deflate block
    // type, no zstd magic).
    const uint64_t garbage = p.descriptors[3];
    const CompressedDescriptor g = DecodeCompressed(garbage, h.cluster_bits);
    std::fill_n(p.file.begin() + ptrdiff_t(g.offset), 8, 0xff);
    // A whole stream that holds half a cluster.
    Bytes half = Text(cs / 2, 99), out(cs);
    const size_t len = Compress(type, half, out);
    REQUIRE(len > 0);
    const uint64_t short_at = p.file.size();
    p.file.insert(p.file.end(), out.begin(), out.begin() + ptrdiff_t(len));
    p.file.resize((p.file.size() + 511) / 512 * 512);
    const uint64_t short_stream = EncodeCompressed(short_at, len, h.cluster_bits);
    // A fragment past the end of the file reads as zeros: no valid stream.
    const uint64_t past_end = EncodeCompressed(p.file.size() + 10 * cs, 1000, h.cluster_bits);
    // And a fragment the file cuts short.
    const uint64_t cut = EncodeCompressed(p.file.size() - 100, 1000, h.cluster_bits);
    std::vector<uint64_t> all = p.descriptors;
    all.insert(all.end(), {short_stream, past_end, cut});

    CountingFile file(p.file);
    const Outcome o = HashAll(file, h, all);
    CHECK(o.calls == all.size());
    CHECK(o.errors.size() == 4);
    for (uint64_t bad : {garbage, short_stream, past_end, cut}) {
      CAPTURE(bad);
      REQUIRE(o.errors.count(bad));
      CHECK(o.errors.at(bad).kind() == ErrorKind::kCorruption);
    }
    for (uint64_t d : p.descriptors)
      if (d != garbage) CHECK(o.digests.at(d) == p.want.at(d));
  }
}

TEST_CASE("a failed read is handed on as itself, not as corruption") {
  const Header h = MakeHeader(16, CompressionType::kDeflate);
  const Packed p = Pack(h, 10);
  CountingFile file(p.file);
  file.bad_begin = 0;
  file.bad_end = p.file.size();
  const Outcome o = HashAll(file, h, p.descriptors);
  CHECK(o.calls == p.descriptors.size());
  CHECK(o.digests.empty());
  for (const auto& e : o.errors) CHECK(e.second.kind() == ErrorKind::kIOError);
}
