// ExportRaw (convert -O raw): the bytes written equal the source's, holes
// stay holes, the cache mode decides whether the target is synced at the
// end, and a failing read (on the thread that reads ahead) ends the export
// with that read's error.
#include <doctest/doctest.h>

#include <random>

#include "qcow2dedup/convert.h"
#include "support/memory_file.h"

using namespace qcow2dedup;

namespace {

// Guest bytes in memory; [hole_from, hole_to) reads zero and says so, as a
// sparse raw file does. Reads after the first fail_after fail.
class MemoryDevice final : public BlockDevice {
 public:
  MemoryDevice(std::vector<uint8_t> bytes, uint64_t hole_from, uint64_t hole_to)
      : bytes_(std::move(bytes)), hole_from_(hole_from), hole_to_(hole_to) {}
  uint64_t virtual_size() const override { return bytes_.size(); }
  std::string format() const override { return "raw"; }
  Status Read(uint64_t offset, std::span<uint8_t> buf) override {
    if (reads_++ >= fail_after) return Status::IOError("injected read failure");
    if (offset + buf.size() > bytes_.size()) return Status::InvalidArgument("read beyond the end");
    std::copy_n(bytes_.begin() + long(offset), buf.size(), buf.begin());
    return Status::Ok();
  }
  Result<uint64_t> ZeroRun(uint64_t offset) override {
    return offset >= hole_from_ && offset < hole_to_ ? hole_to_ - offset : 0;
  }
  int fail_after = 1 << 30;

 private:
  std::vector<uint8_t> bytes_;
  uint64_t hole_from_, hole_to_;
  int reads_ = 0;
};

// A MemoryFile that counts its syncs and the bytes written.
class CountingFile final : public File {
 public:
  Status ReadAt(uint64_t o, std::span<uint8_t> b) override { return f_.ReadAt(o, b); }
  Status WriteAt(uint64_t o, std::span<const uint8_t> d) override {
    written += d.size();
    return f_.WriteAt(o, d);
  }
  Status Sync() override {
    ++syncs;
    return f_.Sync();
  }
  Result<uint64_t> Size() override { return f_.Size(); }
  Status Truncate(uint64_t s) override { return f_.Truncate(s); }
  Status Lock(LockMode m) override { return f_.Lock(m); }
  const std::string& name() const override { return f_.name(); }
  int syncs = 0;
  uint64_t written = 0;

 private:
  testing::MemoryFile f_{{}};
};

// 10 MiB and a bit (three chunks and a tail), random but for a zero run
// that the source reports as a hole and a zero run it does not.
struct Source {
  static constexpr uint64_t kSize = (10u << 20) + 512, kHoleFrom = 3u << 20, kHoleTo = 5u << 20;
  std::vector<uint8_t> bytes;
  Source() : bytes(kSize) {
    std::mt19937_64 rng(7);
    for (auto& b : bytes) b = uint8_t(rng());
    std::fill(bytes.begin() + long(kHoleFrom), bytes.begin() + long(kHoleTo), 0);
    std::fill(bytes.begin() + (8l << 20), bytes.begin() + (9l << 20), 0);  // zeros that are data
  }
};

}  // namespace

TEST_CASE("ExportRaw writes the source's bytes, skips its zeros, and syncs once unless unsafe") {
  for (CacheMode cache : {CacheMode::kWriteback, CacheMode::kUnsafe}) {
    CAPTURE(int(cache));
    Source s;
    MemoryDevice src(s.bytes, Source::kHoleFrom, Source::kHoleTo);
    CountingFile dst;
    CopyOptions o;
    o.cache = cache;
    REQUIRE(ExportRaw(src, dst, {}, o).ok());
    CHECK(dst.syncs == (cache == CacheMode::kUnsafe ? 0 : 1));
    std::vector<uint8_t> got(Source::kSize);
    REQUIRE(dst.ReadAt(0, got).ok());
    CHECK(got == s.bytes);
    CHECK(*dst.Size() == Source::kSize);
    // Neither the hole nor the zeros inside the data were written.
    CHECK(dst.written == Source::kSize - (Source::kHoleTo - Source::kHoleFrom) - (1u << 20));
  }
}

TEST_CASE("ExportRaw into a target that holds data writes the zeros too") {
  Source s;
  MemoryDevice src(s.bytes, Source::kHoleFrom, Source::kHoleTo);
  CountingFile dst;
  REQUIRE(dst.WriteAt(0, std::vector<uint8_t>(Source::kSize, 0xaa)).ok());
  dst.written = 0;
  CopyOptions o;
  o.target = TargetState::kAnyData;
  REQUIRE(ExportRaw(src, dst, {}, o).ok());
  std::vector<uint8_t> got(Source::kSize);
  REQUIRE(dst.ReadAt(0, got).ok());
  CHECK(got == s.bytes);
  CHECK(dst.written == Source::kSize);
}

TEST_CASE("a failing source read ends ExportRaw with that error") {
  for (int fail_after = 0; fail_after < 3; ++fail_after) {  // the source is read in 3 chunks
    CAPTURE(fail_after);
    Source s;
    MemoryDevice src(s.bytes, Source::kHoleFrom, Source::kHoleTo);
    src.fail_after = fail_after;
    CountingFile dst;
    Status st = ExportRaw(src, dst, {}, {});
    REQUIRE_FALSE(st.ok());
    CHECK(st.kind() == ErrorKind::kIOError);
    CHECK(dst.syncs == 0);
  }
}
