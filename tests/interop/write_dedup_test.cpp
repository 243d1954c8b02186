// The dedup write path judged by stock QEMU and by our own reading of the
// tables: data already stored is linked rather than stored again (also
// after a reopen), shared clusters survive an overwrite of one reference,
// narrow refcounts stop sharing in time, --verify, writes past the end,
// zero writes, backing files, and convert from standard input.
#include <doctest/doctest.h>

#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dedup/index.h"
#include "support/stored_index.h"
#include "dedup/sha256.h"
#include "format/endian.h"
#include "format/header.h"
#include "qcow2dedup/image.h"
#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/image_helpers.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using namespace testing;

namespace {

constexpr uint64_t kCs = 65536;
constexpr uint64_t kDedupInSyncBit = 1ull << 48;


std::string AsString(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

std::unique_ptr<Image> CreateImage(const std::string& path, uint64_t vsize, uint32_t refcount_bits = 16,
                                   uint64_t cs = kCs) {
  CreateOptions o;
  o.virtual_size = vsize;
  o.cluster_size = uint32_t(cs);
  o.refcount_bits = refcount_bits;
  auto img = Image::Create(path, o);
  REQUIRE_MESSAGE(img.ok(), img.status().message());
  return std::move(img).value();
}


void MustWrite(Image& img, uint64_t off, const std::vector<uint8_t>& data) {
  Status s = img.Write(off, data);
  INFO("write of " << data.size() << " bytes at " << off);
  REQUIRE_MESSAGE(s.ok(), s.message());
}

void MustClose(Image& img) {
  Status s = img.Close();
  REQUIRE_MESSAGE(s.ok(), s.message());
}

Qcow2Layout Layout(const std::string& path) {
  std::string err;
  auto l = ReadQcow2Layout(path, &err);
  REQUIRE_MESSAGE(l.has_value(), path << ": " << err);
  INFO("layout problems of " << path << ": " << (l->problems.empty() ? "none" : l->problems.front()));
  CHECK(l->refcount_mismatches == 0);
  CHECK(l->copied_mismatches == 0);
  return *l;
}

// The guest view every test keeps beside its image.
struct Mirror {
  explicit Mirror(uint64_t size, uint8_t fill = 0) : bytes(size, fill) {}
  void Put(uint64_t off, const std::vector<uint8_t>& d) { std::memcpy(&bytes[off], d.data(), d.size()); }
  void Save(const std::string& path) const { WriteFileBytes(path, AsString(bytes)); }
  std::vector<uint8_t> bytes;
};

// qemu-img check and compare on image against what mirror holds.
void Judge(const std::string& image, const Mirror& m, const TempDir& dir) {
  const std::string raw = dir / "expected.raw";
  m.Save(raw);
  CheckQemuClean(image);
  CheckQemuIdentical(image, raw);
}

std::string CliWrite(const std::string& image, uint64_t off, const std::string& how) {
  return Tool() + " write " + how + " " + Sh(image) + " " + std::to_string(off);
}

}  // namespace

TEST_CASE("data the reopened image already holds is linked, not stored again") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 16ull << 20;
  Mirror m(vsize);
  const std::vector<uint8_t> d = RandomBytes(8 * kCs, 1);
  {
    auto img = CreateImage(img_path, vsize);
    MustWrite(*img, 0, d);
    CHECK(img->write_stats().new_clusters == 8);
    MustClose(*img);
  }
  m.Put(0, d);
  Judge(img_path, m, dir);
  const Qcow2Layout first = Layout(img_path);
  CHECK(first.stored_data_clusters() == 8);
  const uint64_t size1 = FileSize(img_path);

  SUBCASE("library") {
    auto img = OpenWritable(img_path);
    MustWrite(*img, 4 << 20, d);
    CHECK(img->write_stats().new_clusters == 0);
    CHECK(img->write_stats().dedup_hits == 8);
    MustClose(*img);
    img.reset();  // and its lock
    m.Put(4 << 20, d);
    Judge(img_path, m, dir);
    const Qcow2Layout l = Layout(img_path);
    CHECK(l.stored_data_clusters() == 8);
    CHECK(l.data_references() == 16);
    CHECK(l.max_sharing() == 2);
    for (uint64_t i = 0; i < 8; ++i) CHECK(l.HostOffset(i) == l.HostOffset((4 << 20) / kCs + i));
    CHECK(FileSize(img_path) == size1);
  }
  SUBCASE("CLI, from a file and from standard input") {
    WriteFileBytes(dir / "d.bin", AsString(d));
    RunResult r = Run(CliWrite(img_path, 8 << 20, "--input " + Sh(dir / "d.bin")));
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    r = Run("cat " + Sh(dir / "d.bin") + " | " + CliWrite(img_path, 12 << 20, "--input -"));
    REQUIRE(r.exit_code == 0);
    m.Put(8 << 20, d);
    m.Put(12 << 20, d);
    Judge(img_path, m, dir);
    const Qcow2Layout l = Layout(img_path);
    CHECK(l.stored_data_clusters() == 8);
    CHECK(l.data_references() == 24);
    CHECK(FileSize(img_path) == size1);
    CHECK((l.autoclear & kDedupInSyncBit) != 0);
  }
  SUBCASE("a pattern written twice through the CLI is stored once") {
    RunResult r = Run(CliWrite(img_path, 1 << 20, "--pattern 0x5a --length 192K"));
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    r = Run(CliWrite(img_path, 2 << 20, "--pattern 90 --length 64K"));
    REQUIRE(r.exit_code == 0);
    std::memset(&m.bytes[1 << 20], 0x5a, 3 * kCs);
    std::memset(&m.bytes[2 << 20], 0x5a, kCs);
    Judge(img_path, m, dir);
    const Qcow2Layout l = Layout(img_path);
    CHECK(l.stored_data_clusters() == 9);
    CHECK(l.max_sharing() == 4);
  }
}

TEST_CASE("overwriting a shared cluster leaves the other references intact") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 4ull << 20;
  Mirror m(vsize);
  const std::vector<uint8_t> d = RandomBytes(kCs, 2);
  {
    auto img = CreateImage(img_path, vsize);
    for (uint64_t g : {0, 3, 7}) {
      MustWrite(*img, g * kCs, d);
      m.Put(g * kCs, d);
    }
    MustClose(*img);
  }
  Qcow2Layout l = Layout(img_path);
  REQUIRE(l.stored_data_clusters() == 1);
  const uint64_t host = l.HostOffset(0);
  CHECK(l.refcounts.at(host / kCs) == 3);
  CHECK((l.l2_entries[0] & Qcow2Layout::kCopied) == 0);

  // One reference overwritten in part (a partial cluster completed from the
  // shared data), through a reopened image.
  {
    auto img = OpenWritable(img_path);
    const std::vector<uint8_t> x = RandomBytes(100, 3);
    MustWrite(*img, 3 * kCs + 10, x);
    m.Put(3 * kCs + 10, x);
    MustClose(*img);
  }
  Judge(img_path, m, dir);
  l = Layout(img_path);
  CHECK(l.HostOffset(0) == host);
  CHECK(l.HostOffset(7) == host);
  CHECK(l.HostOffset(3) != host);
  CHECK(l.refcounts.at(host / kCs) == 2);

  // The next one overwritten whole through the CLI: one reference is left,
  // and it must carry COPIED again.
  RunResult r = Run(CliWrite(img_path, 7 * kCs, "--pattern 0x33 --length 64K"));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  std::memset(&m.bytes[7 * kCs], 0x33, kCs);
  Judge(img_path, m, dir);
  l = Layout(img_path);
  CHECK(l.HostOffset(0) == host);
  CHECK(l.refcounts.at(host / kCs) == 1);
  CHECK((l.l2_entries[0] & Qcow2Layout::kCopied) != 0);

  // And QEMU sees the survivor's bytes.
  r = Run("qemu-io -f qcow2 -c " + Sh("read -v 0 16") + " " + Sh(img_path));
  REQUIRE(r.exit_code == 0);
  char hex[8];
  std::snprintf(hex, sizeof hex, "%02x %02x", d[0], d[1]);
  CHECK(r.out.find(hex) != std::string::npos);
}

TEST_CASE("refcount_bits=1 stores every copy") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 2ull << 20;
  Mirror m(vsize);
  const std::vector<uint8_t> d = RandomBytes(kCs, 4);
  {
    auto img = CreateImage(img_path, vsize, /*refcount_bits=*/1);
    for (uint64_t g = 0; g < 5; ++g) {
      MustWrite(*img, g * 2 * kCs, d);
      m.Put(g * 2 * kCs, d);
    }
    CHECK(img->write_stats().new_clusters == 5);
    CHECK(img->write_stats().dedup_hits == 0);
    MustClose(*img);
  }
  // And again after a reopen.
  {
    auto img = OpenWritable(img_path);
    MustWrite(*img, 15 * kCs, d);
    m.Put(15 * kCs, d);
    CHECK(img->write_stats().new_clusters == 1);
    MustClose(*img);
  }
  Judge(img_path, m, dir);
  nlohmann::json info = QemuImgInfo(img_path);
  CHECK(info["format-specific"]["data"]["refcount-bits"] == 1);
  const Qcow2Layout l = Layout(img_path);
  CHECK(l.refcount_bits == 1);
  CHECK(l.stored_data_clusters() == 6);
  CHECK(l.max_sharing() == 1);

  SUBCASE("convert -o refcount_bits=1") {
    WriteFileBytes(dir / "src.raw", AsString(m.bytes));
    RunResult r = Run(Tool() + " convert -f raw -O qcow2 -o refcount_bits=1 " + Sh(dir / "src.raw") + " " +
                      Sh(dir / "conv.qcow2"));
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    Judge(dir / "conv.qcow2", m, dir);
    const Qcow2Layout c = Layout(dir / "conv.qcow2");
    CHECK(c.stored_data_clusters() == 6);
    CHECK(c.max_sharing() == 1);
  }
}

TEST_CASE("refcount_bits=4 shares up to half its maximum, then stores a new copy") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 2ull << 20;
  Mirror m(vsize);
  const std::vector<uint8_t> d = RandomBytes(kCs, 5);
  {
    auto img = CreateImage(img_path, vsize, /*refcount_bits=*/4);
    for (uint64_t g = 0; g < 12; ++g) {
      MustWrite(*img, g * kCs, d);
      m.Put(g * kCs, d);
    }
    CHECK(img->write_stats().dedup_hits > 0);
    MustClose(*img);
  }
  {
    auto img = OpenWritable(img_path);
    for (uint64_t g = 20; g < 28; ++g) {
      MustWrite(*img, g * kCs, d);
      m.Put(g * kCs, d);
    }
    MustClose(*img);
  }
  Judge(img_path, m, dir);
  const Qcow2Layout l = Layout(img_path);
  CHECK(l.refcount_bits == 4);
  // 20 references; a 4-bit refcount holds at most 15, and sharing stops at
  // half of that so that an internal snapshot (which doubles it) still fits.
  CHECK(l.data_references() == 20);
  CHECK(l.max_sharing() == 7);
  for (const auto& [c, r] : l.refcounts) CHECK(r <= 7);
  CHECK(l.stored_data_clusters() == 3);
}

TEST_CASE("refcount_bits=2 shares nothing: half its maximum is one") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  Mirror m(1 << 20);
  const std::vector<uint8_t> d = RandomBytes(kCs, 6);
  {
    auto img = CreateImage(img_path, 1 << 20, /*refcount_bits=*/2);
    for (uint64_t g = 0; g < 4; ++g) {
      MustWrite(*img, g * kCs, d);
      m.Put(g * kCs, d);
    }
    MustClose(*img);
  }
  Judge(img_path, m, dir);
  CHECK(Layout(img_path).max_sharing() == 1);
  CHECK(Layout(img_path).stored_data_clusters() == 4);
}

// An internal snapshot adds one reference per L2 entry, so a cluster shared
// n times needs room for 2n: stock QEMU must be able to snapshot an image we
// wrote.
TEST_CASE("qemu-img snapshot -c works on a dedup image with shared clusters") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  uint64_t copies = 0, cs = kCs;
  uint32_t bits = 16;
  SUBCASE("refcount_bits=4, a cluster shared to the writer's limit") {
    bits = 4;
    copies = 7;
  }
  SUBCASE("refcount_bits=16, a cluster shared 30000 times") {
    bits = 16;
    copies = 30000;
    cs = 4096;
  }
  const uint64_t vsize = (copies + 1) * cs;
  Mirror m(vsize);
  {
    auto img = CreateImage(img_path, vsize, bits, cs);
    const std::vector<uint8_t> d = RandomBytes(cs, 15);
    for (uint64_t g = 0; g < copies; ++g) {
      MustWrite(*img, g * cs, d);
      m.Put(g * cs, d);
    }
    CHECK(img->write_stats().new_clusters == 1);
    MustClose(*img);
  }
  Judge(img_path, m, dir);
  CHECK(Layout(img_path).max_sharing() == copies);
  RunResult r = Run("qemu-img snapshot -c s1 " + Sh(img_path));
  INFO("refcount_bits=" << bits << ", " << copies << " references: " << r.out << r.err);
  CHECK(r.exit_code == 0);
  QemuCheckResult c = QemuImgCheck(img_path);
  INFO("qemu-img check after the snapshot: " << c.out << c.err);
  CHECK(c.exit_code == 0);
  CHECK(c.Get("corruptions") == 0);
  CHECK(c.Get("leaks") == 0);
}

TEST_CASE("--verify compares bytes before sharing") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 4ull << 20;
  Mirror m(vsize);
  const std::vector<uint8_t> d = RandomBytes(2 * kCs, 6);
  {
    auto img = CreateImage(img_path, vsize);
    MustWrite(*img, 0, d);
    MustClose(*img);
  }
  m.Put(0, d);
  WriteFileBytes(dir / "d.bin", AsString(d));

  SUBCASE("identical data is still shared") {
    RunResult r = Run(CliWrite(img_path, 1 << 20, "--verify --input " + Sh(dir / "d.bin")));
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    m.Put(1 << 20, d);
    Judge(img_path, m, dir);
    CHECK(Layout(img_path).stored_data_clusters() == 2);
    // The library option too.
    auto img = OpenWritable(img_path, /*verify=*/true);
    MustWrite(*img, 2 << 20, d);
    CHECK(img->write_stats().dedup_hits == 2);
    CHECK(img->write_stats().new_clusters == 0);
    MustClose(*img);
    img.reset();
    m.Put(2 << 20, d);
    Judge(img_path, m, dir);
    CHECK(Layout(img_path).stored_data_clusters() == 2);
  }
  SUBCASE("a cluster whose bytes no longer match its hash is not shared") {
    // Change the stored bytes of guest cluster 0 behind the index's back
    // (what a hash collision would look like): the index still says that
    // host cluster holds d's first cluster.
    Qcow2Layout l = Layout(img_path);
    const uint64_t host = l.HostOffset(0);
    REQUIRE(host != 0);
    std::string file = ReadFileBytes(img_path);
    const std::vector<uint8_t> other = RandomBytes(kCs, 7);
    file.replace(host, kCs, AsString(other));
    WriteFileBytes(img_path, file);
    m.Put(0, other);

    RunResult r = Run(CliWrite(img_path, 1 << 20, "--verify --input " + Sh(dir / "d.bin")));
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    m.Put(1 << 20, d);
    Judge(img_path, m, dir);
    l = Layout(img_path);
    CHECK(l.HostOffset((1 << 20) / kCs) != host);
    CHECK(l.HostOffset((1 << 20) / kCs + 1) == l.HostOffset(1));  // the untouched one is shared
    CHECK(l.stored_data_clusters() == 3);
  }
}

TEST_CASE("a write past the virtual size fails with one line and changes nothing") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = (1ull << 20) + 512;

  auto expect_refused = [&](const std::string& cmd) {
    const std::string before = ReadFileBytes(img_path);
    RunResult r = Run(cmd);
    INFO(cmd << "\nstdout: " << r.out << "\nstderr: " << r.err);
    CHECK(r.exit_code != 0);
    CHECK(LineCount(r.err) == 1);
    CHECK(r.out.empty());
    const std::string after = ReadFileBytes(img_path);
    const bool unchanged = after == before;
    CHECK_MESSAGE(unchanged, "the image changed: " << before.size() << " bytes (hash " << std::hash<std::string>{}(before)
                                                   << ") before, " << after.size() << " bytes (hash "
                                                   << std::hash<std::string>{}(after) << ") after");
  };
  auto cases = [&] {
    WriteFileBytes(dir / "big.bin", std::string(vsize + 1, 'x'));
    expect_refused(CliWrite(img_path, vsize - 2048, "--pattern 0x11 --length 4096"));
    expect_refused(CliWrite(img_path, vsize, "--pattern 0x11 --length 1"));
    expect_refused(CliWrite(img_path, 1ull << 40, "--pattern 0x11 --length 1"));
    expect_refused(CliWrite(img_path, 0, "--input " + Sh(dir / "big.bin")));
    expect_refused("head -c 2048 /dev/zero | tr '\\0' 'y' | " + CliWrite(img_path, vsize - 1024, "--input -"));
  };

  SUBCASE("an image of ours (index in sync)") {
    {
      auto img = CreateImage(img_path, vsize);
      MustWrite(*img, 0, RandomBytes(100000, 8));
      // The library refuses too, and nothing reaches the file.
      Status s = img->Write(vsize - 10, std::vector<uint8_t>(11, 1));
      CHECK(s.kind() == ErrorKind::kInvalidArgument);
      MustClose(*img);
    }
    const std::string before = ReadFileBytes(img_path);
    {
      auto img = OpenWritable(img_path);
      CHECK(!img->Write(vsize, std::vector<uint8_t>(1, 1)).ok());
      CHECK(!img->Write(~0ull - 10, std::vector<uint8_t>(100, 1)).ok());
      MustClose(*img);
    }
    CHECK(ReadFileBytes(img_path) == before);
    cases();
    // The last bytes themselves are writable.
    RunResult r = Run(CliWrite(img_path, vsize - 512, "--pattern 0x22 --length 512"));
    INFO(r.out << r.err);
    CHECK(r.exit_code == 0);
    r = Run("qemu-io -f qcow2 -c " + Sh("read -P 0x22 " + std::to_string(vsize - 512) + " 512") + " " + Sh(img_path));
    CHECK(r.exit_code == 0);
    CHECK(r.out.find("Pattern verification failed") == std::string::npos);
  }
  SUBCASE("an image qemu-img created (no index yet)") {
    RunResult r = Run("qemu-img create -q -f qcow2 " + Sh(img_path) + " " + std::to_string(vsize) +
                      " && qemu-io -f qcow2 -c 'write -P 7 0 100000' " + Sh(img_path));
    REQUIRE(r.exit_code == 0);
    cases();
  }
  CheckQemuClean(img_path);
}

TEST_CASE("zeros over data free the cluster, and the space is used again") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 4ull << 20;
  Mirror m(vsize);
  const std::vector<uint8_t> d = RandomBytes(4 * kCs, 9);
  {
    auto img = CreateImage(img_path, vsize);
    MustWrite(*img, 0, d);
    MustClose(*img);
  }
  m.Put(0, d);
  const uint64_t size1 = FileSize(img_path);
  {
    auto img = OpenWritable(img_path);
    MustWrite(*img, kCs, std::vector<uint8_t>(2 * kCs, 0));
    CHECK(img->write_stats().freed_clusters == 2);
    CHECK(img->write_stats().zero_clusters == 2);
    MustClose(*img);
  }
  std::memset(&m.bytes[kCs], 0, 2 * kCs);
  Judge(img_path, m, dir);
  Qcow2Layout l = Layout(img_path);
  CHECK(l.stored_data_clusters() == 2);
  CHECK(l.IsUnallocated(1));  // no backing file: unallocated reads as zero
  CHECK(l.IsUnallocated(2));
  CHECK(FileSize(img_path) <= size1);

  // Through the CLI: zeros over the last data cluster.
  RunResult r = Run(CliWrite(img_path, 3 * kCs, "--pattern 0 --length 64K"));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  std::memset(&m.bytes[3 * kCs], 0, kCs);
  Judge(img_path, m, dir);
  CHECK(Layout(img_path).stored_data_clusters() == 1);

  // New data takes the freed clusters: the file does not grow.
  {
    auto img = OpenWritable(img_path);
    const std::vector<uint8_t> e = RandomBytes(3 * kCs, 10);
    MustWrite(*img, 2 << 20, e);
    m.Put(2 << 20, e);
    MustClose(*img);
  }
  Judge(img_path, m, dir);
  CHECK(Layout(img_path).stored_data_clusters() == 4);
  CHECK(FileSize(img_path) <= size1);
}

TEST_CASE("writes into an image with a backing file") {
  TempDir dir;
  const std::string base = dir / "base.qcow2", top = dir / "top.qcow2";
  const uint64_t vsize = 4ull << 20;
  RunResult r = Run("qemu-img create -q -f qcow2 " + Sh(base) + " 4M && qemu-io -f qcow2 -c 'write -P 0x61 0 4M' " +
                    Sh(base) + " && qemu-img create -q -f qcow2 -b " + Sh(base) + " -F qcow2 " + Sh(top));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  Mirror m(vsize, 0x61);
  {
    auto img = OpenWritable(top);
    REQUIRE(img->virtual_size() == vsize);
    // Partial clusters: the rest comes from the backing file.
    const std::vector<uint8_t> x(100, 0x62);
    MustWrite(*img, kCs + 1000, x);
    m.Put(kCs + 1000, x);
    const std::vector<uint8_t> y = RandomBytes(kCs, 11);
    MustWrite(*img, 4 * kCs + kCs / 2, y);  // across a cluster boundary
    m.Put(4 * kCs + kCs / 2, y);
    // Whole zero clusters over backing data: the zero flag.
    MustWrite(*img, 2 * kCs, std::vector<uint8_t>(2 * kCs, 0));
    std::memset(&m.bytes[2 * kCs], 0, 2 * kCs);
    // Zeros over part of a cluster: backing data around them.
    MustWrite(*img, 8 * kCs + 5, std::vector<uint8_t>(1000, 0));
    std::memset(&m.bytes[8 * kCs + 5], 0, 1000);
    // The backing file's bytes written twice: stored once (in the top).
    MustWrite(*img, 10 * kCs, std::vector<uint8_t>(2 * kCs, 0x61));
    // Data in the top, then zeros over it: the cluster is freed and the
    // zero flag hides the backing data below.
    const std::vector<uint8_t> z = RandomBytes(kCs, 16);
    MustWrite(*img, 14 * kCs, z);
    MustClose(*img);
  }
  {
    auto img = OpenWritable(top);
    MustWrite(*img, 14 * kCs, std::vector<uint8_t>(kCs, 0));
    CHECK(img->write_stats().freed_clusters == 1);
    std::memset(&m.bytes[14 * kCs], 0, kCs);
    MustClose(*img);
  }
  // Zeros through the CLI.
  r = Run(CliWrite(top, 12 * kCs, "--pattern 0 --length 64K"));
  REQUIRE(r.exit_code == 0);
  std::memset(&m.bytes[12 * kCs], 0, kCs);

  Judge(top, m, dir);
  nlohmann::json info = QemuImgInfo(top);
  CHECK(info["backing-filename"] == base);
  const Qcow2Layout l = Layout(top);
  CHECK(l.backing_file == base);
  CHECK(l.IsZeroFlagged(2));
  CHECK(l.IsZeroFlagged(3));
  CHECK(l.IsZeroFlagged(12));
  CHECK(l.IsZeroFlagged(14));
  CHECK(l.HostOffset(14) == 0);
  CHECK(l.HostOffset(2) == 0);
  CHECK(l.IsUnallocated(0));   // untouched: still the backing file's
  CHECK(l.IsUnallocated(20));
  CHECK(l.HostOffset(10) != 0);
  CHECK(l.HostOffset(10) == l.HostOffset(11));
  CHECK(l.HostOffset(1) != 0);
  CHECK(l.HostOffset(8) != 0);
  // The base is untouched.
  Mirror b(vsize, 0x61);
  WriteFileBytes(dir / "base.raw", AsString(b.bytes));
  CheckQemuIdentical(base, dir / "base.raw");
  // qemu-io reads the zero flag as zeros, above the 0x61 below.
  r = Run("qemu-io -f qcow2 -c " + Sh("read -P 0 " + std::to_string(2 * kCs) + " " + std::to_string(2 * kCs)) + " " +
          Sh(top));
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("Pattern verification failed") == std::string::npos);
}

TEST_CASE("convert from standard input") {
  TempDir dir;
  // 9.5 MiB and a few bytes (more than one read chunk, not a multiple of
  // 512): repeated clusters, zeros and random data.
  std::vector<uint8_t> disk = RandomBytes((9ull << 20) + (1ull << 19) + 77, 12);
  const std::vector<uint8_t> rep = RandomBytes(kCs, 13);
  for (uint64_t g : {3, 17, 40, 90, 140}) std::memcpy(&disk[g * kCs], rep.data(), kCs);
  std::memset(&disk[50 * kCs], 0, 10 * kCs);
  WriteFileBytes(dir / "disk.raw", AsString(disk));

  RunResult r = Run("cat " + Sh(dir / "disk.raw") + " | " + Tool() + " convert - " + Sh(dir / "out.qcow2"));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  nlohmann::json info = QemuImgInfo(dir / "out.qcow2");
  REQUIRE(info.is_object());
  CHECK(info["virtual-size"] == (disk.size() + 511) / 512 * 512);
  CheckQemuClean(dir / "out.qcow2");
  CheckQemuIdentical(dir / "out.qcow2", dir / "disk.raw");
  r = Run("python3 " + Sh(QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py") + " " + Sh(dir / "disk.raw") +
          " 65536");
  REQUIRE(r.exit_code == 0);
  const uint64_t unique = nlohmann::json::parse(r.out)["unique"].get<uint64_t>();
  const Qcow2Layout l = Layout(dir / "out.qcow2");
  CHECK(l.stored_data_clusters() == unique);
  CHECK(l.max_sharing() == 5);

  SUBCASE("4K clusters") {
    r = Run("cat " + Sh(dir / "disk.raw") + " | " + Tool() + " convert -o cluster_size=4K - " +
            Sh(dir / "out4k.qcow2"));
    REQUIRE(r.exit_code == 0);
    info = QemuImgInfo(dir / "out4k.qcow2");
    CHECK(info["virtual-size"] == (disk.size() + 511) / 512 * 512);
    CHECK(info["cluster-size"] == 4096);
    CheckQemuClean(dir / "out4k.qcow2");
    CheckQemuIdentical(dir / "out4k.qcow2", dir / "disk.raw");
  }
  SUBCASE("an empty stream") {
    r = Run(Tool() + " convert - " + Sh(dir / "empty.qcow2"));
    REQUIRE(r.exit_code == 0);
    info = QemuImgInfo(dir / "empty.qcow2");
    CHECK(info["virtual-size"] == 0);
    CheckQemuClean(dir / "empty.qcow2");
  }
  SUBCASE("a stream of 1000 bytes") {
    r = Run("head -c 1000 " + Sh(dir / "disk.raw") + " | " + Tool() + " convert - " + Sh(dir / "small.qcow2"));
    REQUIRE(r.exit_code == 0);
    info = QemuImgInfo(dir / "small.qcow2");
    CHECK(info["virtual-size"] == 1024);
    WriteFileBytes(dir / "small.raw", AsString(std::vector<uint8_t>(disk.begin(), disk.begin() + 1000)));
    CheckQemuClean(dir / "small.qcow2");
    CheckQemuIdentical(dir / "small.qcow2", dir / "small.raw");
  }
}

// QEMU copy-on-writes away from a cluster that two guest clusters share:
// the refcount drops to 1, but QEMU does not set COPIED on the other L2
// entry, and qemu-img check then reports "ERROR OFLAG_COPIED data cluster".
// QEMU cleared our "in sync" bit, so our next writable open rebuilds the
// index from every L2 table; it must leave the image clean when it closes.
TEST_CASE("after QEMU copy-on-writes a shared cluster, our next session leaves the image clean") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 1ull << 20;
  Mirror m(vsize);
  {
    auto img = CreateImage(img_path, vsize);
    MustWrite(*img, 0, std::vector<uint8_t>(2 * kCs, 0x11));
    MustClose(*img);
  }
  std::memset(&m.bytes[0], 0x11, 2 * kCs);
  Judge(img_path, m, dir);
  RunResult r = Run("qemu-io -f qcow2 -c 'write -P 0x22 0 512' " + Sh(img_path));
  REQUIRE(r.exit_code == 0);
  std::memset(&m.bytes[0], 0x22, 512);
  {
    QemuCheckResult c = QemuImgCheck(img_path);
    MESSAGE("qemu-img check after qemu-io: exit " << c.exit_code << "; " << c.err);
  }

  SUBCASE("a library session that writes elsewhere") {
    auto img = OpenWritable(img_path);
    const std::vector<uint8_t> x = RandomBytes(kCs, 14);
    MustWrite(*img, 8 * kCs, x);
    m.Put(8 * kCs, x);
    MustClose(*img);
  }
  SUBCASE("a CLI write elsewhere") {
    r = Run(CliWrite(img_path, 8 * kCs, "--pattern 0x33 --length 64K"));
    REQUIRE(r.exit_code == 0);
    std::memset(&m.bytes[8 * kCs], 0x33, kCs);
  }
  Judge(img_path, m, dir);
  Layout(img_path);
}

namespace {

// Rewrites the stored index so that its entry for host cluster `cluster`
// claims `data`, with the header still vouching for the lie.
void LieInIndex(const std::string& path, uint64_t cluster, const std::vector<uint8_t>& data) {
  testing::RewriteStoredIndex(path, [&](DedupIndex& index) {
    std::optional<Fingerprint> truth;
    index.ForEach([&](Fingerprint key, uint64_t c) {
      if (c == cluster) truth = key;
    });
    REQUIRE(truth);
    REQUIRE(index.Remove(*truth, cluster));
    index.Insert(Sha256(data), cluster);
  });
}

}  // namespace

TEST_CASE("an index entry from disk that lies about the cluster a guest cluster maps is not believed") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 4 * kCs;
  Mirror m(vsize);
  const std::vector<uint8_t> e = RandomBytes(kCs, 21), d = RandomBytes(kCs, 22);
  {
    auto img = CreateImage(img_path, vsize);
    MustWrite(*img, 0, e);
    MustClose(*img);
  }
  const uint64_t host = Layout(img_path).HostOffset(0) / kCs;
  // The index now says guest cluster 0's host cluster holds d: writing d
  // there must not be taken for "the same data again".
  LieInIndex(img_path, host, d);
  {
    auto img = OpenWritable(img_path);
    MustWrite(*img, 0, d);
    MustWrite(*img, kCs, e);  // e is still stored nowhere the index admits
    MustClose(*img);
  }
  m.Put(0, d);
  m.Put(kCs, e);
  Judge(img_path, m, dir);
  RunResult r = Run(Tool() + " check " + Sh(img_path));
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
}

TEST_CASE("freeing one copy of data stored twice leaves the other findable") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 8 * kCs;
  Mirror m(vsize);
  const std::vector<uint8_t> a = RandomBytes(kCs, 31), b = RandomBytes(kCs, 32);
  {
    auto img = CreateImage(img_path, vsize, /*refcount_bits=*/1);  // every copy is stored
    MustWrite(*img, 0, a);
    MustWrite(*img, kCs, a);
    MustClose(*img);
  }
  CHECK(Layout(img_path).stored_data_clusters() == 2);
  for (uint64_t freed : {uint64_t(0), kCs}) {
    CAPTURE(freed);
    const std::string copy = dir / "copy.qcow2";
    WriteFileBytes(copy, ReadFileBytes(img_path));
    Mirror mm = m;
    mm.Put(0, a);
    mm.Put(kCs, a);
    {
      auto img = OpenWritable(copy);
      MustWrite(*img, freed, b);
      MustClose(*img);
    }
    mm.Put(freed, b);
    Judge(copy, mm, dir);
    RunResult r = Run(Tool() + " check " + Sh(copy));
    INFO(r.out << r.err);
    CHECK(r.exit_code == 0);
  }
}

TEST_CASE("-t unsafe writes the same image as -t writeback, without a single sync") {
  TempDir dir;
  std::string raw;
  for (int i = 0; i < 24; ++i) raw += AsString(RandomBytes(kCs, 40 + i % 5));  // five contents, shared
  WriteFileBytes(dir / "in.raw", raw);
  RunResult safe = Run(Tool() + " convert -t writeback " + Sh(dir / "in.raw") + " " + Sh(dir / "safe.qcow2"));
  REQUIRE_MESSAGE(safe.exit_code == 0, safe.err);
  // No leak check under strace in an ASan build: LeakSanitizer cannot work under ptrace.
  RunResult unsafe = Run("ASAN_OPTIONS=\"${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0\" "
                         "strace -f -qq -e trace=fsync,fdatasync,sync_file_range,syncfs -o " + Sh(dir / "trace") +
                         " " + Tool() + " convert -t unsafe " + Sh(dir / "in.raw") + " " + Sh(dir / "unsafe.qcow2"));
  REQUIRE_MESSAGE(unsafe.exit_code == 0, unsafe.err);
  CHECK(ReadFileBytes(dir / "safe.qcow2") == ReadFileBytes(dir / "unsafe.qcow2"));
  CHECK(ReadFileBytes(dir / "trace").find("sync") == std::string::npos);
  CheckQemuClean(dir / "unsafe.qcow2");
  CheckQemuIdentical(dir / "unsafe.qcow2", dir / "in.raw");
  CHECK(Layout(dir / "unsafe.qcow2").stored_data_clusters() == 5);
}

TEST_CASE("a write repairs an image that was not closed cleanly first, as QEMU does") {
  TempDir dir;
  const std::string img_path = dir / "img.qcow2";
  const uint64_t vsize = 8 * kCs;
  Mirror m(vsize);
  const std::vector<uint8_t> a = RandomBytes(kCs, 51), b = RandomBytes(kCs, 52);
  {
    auto img = CreateImage(img_path, vsize);
    MustWrite(*img, 0, a);
    MustWrite(*img, 2 * kCs, a);
    MustClose(*img);
  }
  m.Put(0, a);
  m.Put(2 * kCs, a);
  // What a crash between allocating a cluster and linking it leaves: a
  // cluster with refcount 1 and no reference, the dirty bit, the index out
  // of sync.
  {
    const Qcow2Layout l = Layout(img_path);
    REQUIRE(l.refcount_bits == 16);
    std::string bytes = ReadFileBytes(img_path);
    const uint64_t leaked = bytes.size() / kCs;
    bytes.resize(bytes.size() + kCs, '\x5a');
    bytes[l.refblocks[0] + leaked * 2 + 1] = 1;
    StoreBe64(reinterpret_cast<uint8_t*>(&bytes[72]), l.incompatible | 1);
    StoreBe64(reinterpret_cast<uint8_t*>(&bytes[88]), l.autoclear & ~kDedupInSyncBit);
    WriteFileBytes(img_path, bytes);
  }
  CHECK(Run("qemu-img check -q " + Sh(img_path)).exit_code == 3);
  RunResult r = Run(CliWrite(img_path, kCs, "--input -") + " < /dev/null");  // a write of nothing still opens it
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  WriteFileBytes(dir / "b.bin", AsString(b));
  r = Run(CliWrite(img_path, 4 * kCs, "--input " + Sh(dir / "b.bin")));
  REQUIRE(r.exit_code == 0);
  m.Put(4 * kCs, b);
  Judge(img_path, m, dir);
  const Qcow2Layout l = Layout(img_path);
  CHECK((l.incompatible & 1) == 0);
  CHECK((l.autoclear & kDedupInSyncBit) != 0);
  CHECK(l.stored_data_clusters() == 2);
  CHECK(Run(Tool() + " check " + Sh(img_path)).exit_code == 0);
}
