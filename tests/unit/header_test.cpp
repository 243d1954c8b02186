// format/header: ParseHeader and EncodeHeader against hand-built headers,
// against images written by stock qemu-img, and against every way a header
// can be wrong or cut short.
#include "format/header.h"

#include <algorithm>
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cstddef>
#include <fstream>
#include <nlohmann/json.hpp>

#include "support/process.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Run;
using testing::Sh;
using testing::TempDir;

namespace {

using Bytes = std::vector<uint8_t>;

Bytes ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE(f.good());
  return Bytes(std::istreambuf_iterator<char>(f), {});
}

uint32_t Get32(const Bytes& b, size_t at) {
  return uint32_t(b[at]) << 24 | uint32_t(b[at + 1]) << 16 | uint32_t(b[at + 2]) << 8 | b[at + 3];
}
uint64_t Get64(const Bytes& b, size_t at) { return uint64_t(Get32(b, at)) << 32 | Get32(b, at + 4); }
void Put32(Bytes& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = uint8_t(v >> (24 - 8 * i));
}
void Put64(Bytes& b, size_t at, uint64_t v) {
  Put32(b, at, uint32_t(v >> 32));
  Put32(b, at + 4, uint32_t(v));
}

// Offsets of the header fields (qcow2.rst).
enum : size_t {
  kMagic = 0, kVersion = 4, kBackingOffset = 8, kBackingSize = 16, kClusterBits = 20, kSize = 24,
  kCrypt = 32, kL1Size = 36, kL1Offset = 40, kRefOffset = 48, kRefClusters = 56, kNbSnapshots = 60,
  kSnapOffset = 64, kIncompat = 72, kCompat = 80, kAutoclear = 88, kRefOrder = 96, kHeaderLength = 100,
  kCompressionType = 104,
};

// The layout the library decodes is the one qcow2.rst gives.
static_assert(offsetof(RawHeader, version) == kVersion && offsetof(RawHeader, backing_file_offset) == kBackingOffset &&
              offsetof(RawHeader, cluster_bits) == kClusterBits && offsetof(RawHeader, size) == kSize &&
              offsetof(RawHeader, l1_size) == kL1Size && offsetof(RawHeader, l1_table_offset) == kL1Offset &&
              offsetof(RawHeader, refcount_table_offset) == kRefOffset &&
              offsetof(RawHeader, refcount_table_clusters) == kRefClusters &&
              offsetof(RawHeader, nb_snapshots) == kNbSnapshots && offsetof(RawHeader, snapshots_offset) == kSnapOffset &&
              offsetof(RawHeader, incompatible_features) == kIncompat &&
              offsetof(RawHeader, autoclear_features) == kAutoclear && offsetof(RawHeader, header_length) == kHeaderLength &&
              offsetof(RawHeader, compression_type) == kCompressionType);

// Parses a whole image file as Image::Open does: cluster 0 at most.
Result<Header> ParseFile(const Bytes& file) {
  std::span<const uint8_t> head(file.data(), std::min<size_t>(file.size(), 2u << 20));
  return ParseHeader(head, file.size());
}

void Qemu(const std::string& cmd) {
  auto r = Run(cmd);
  REQUIRE_MESSAGE(r.exit_code == 0, cmd, "\n", r.out, r.err);
}

void RequireQemu() { testing::RequireCommand("qemu-img"); }

// A v3 header using every part EncodeHeader writes.
Header FullV3() {
  Header h;
  h.version = 3;
  h.cluster_bits = 16;
  h.virtual_size = 3ull << 30;  // 6 L1 entries at 64 KiB clusters
  h.l1_size = 8;
  h.l1_offset = 0x40000;
  h.reftable_offset = 0x10000;
  h.reftable_clusters = 2;
  h.incompatible = kIncompatDirty | kIncompatCompression;
  h.compression = CompressionType::kZstd;
  h.compatible = kCompatLazyRefcounts;
  h.autoclear = kAutoclearDedupInSync;
  h.refcount_order = 5;
  h.header_length = 112;
  h.backing_file = "dir/base image.qcow2";
  h.backing_format = "qcow2";
  h.feature_names[{0, 0}] = "dirty bit";
  h.feature_names[{2, 48}] = "dedup index in sync";
  h.feature_names[{1, 5}] = std::string(46, 'n');  // full length: no terminating zero
  DedupExtension d;
  d.hash_algorithm = kHashSha256;
  d.index_offset = 0x200000;
  d.index_entries = 1234;
  d.index_buckets = 64;
  h.dedup = d;
  h.other_extensions.push_back({0x12345678, {1, 2, 3, 4, 5}});
  h.other_extensions.push_back({0x0badcafe, {}});
  return h;
}

void CheckSame(const Header& a, const Header& b) {
  CHECK(a.version == b.version);
  CHECK(a.cluster_bits == b.cluster_bits);
  CHECK(a.virtual_size == b.virtual_size);
  CHECK(a.crypt_method == b.crypt_method);
  CHECK(a.l1_size == b.l1_size);
  CHECK(a.l1_offset == b.l1_offset);
  CHECK(a.reftable_offset == b.reftable_offset);
  CHECK(a.reftable_clusters == b.reftable_clusters);
  CHECK(a.nb_snapshots == b.nb_snapshots);
  CHECK(a.snapshots_offset == b.snapshots_offset);
  CHECK(a.incompatible == b.incompatible);
  CHECK(a.compatible == b.compatible);
  CHECK(a.autoclear == b.autoclear);
  CHECK(a.refcount_order == b.refcount_order);
  CHECK(a.header_length == b.header_length);
  CHECK(a.compression == b.compression);
  CHECK(a.backing_file == b.backing_file);
  CHECK(a.backing_format == b.backing_format);
  CHECK(a.feature_names == b.feature_names);
  CHECK(a.other_extensions == b.other_extensions);
  REQUIRE(a.dedup.has_value() == b.dedup.has_value());
  if (a.dedup) {
    CHECK(a.dedup->hash_algorithm == b.dedup->hash_algorithm);
    CHECK(a.dedup->index_offset == b.dedup->index_offset);
    CHECK(a.dedup->index_entries == b.dedup->index_entries);
    CHECK(a.dedup->index_buckets == b.dedup->index_buckets);
    CHECK(a.dedup->version == b.dedup->version);
  }
}

struct Ext {
  uint32_t type;
  Bytes data;
  size_t at;  // offset of the type field
};

// Walks the extension area of an encoded v3 header independently of the library.
std::vector<Ext> WalkExtensions(const Bytes& b, size_t start) {
  std::vector<Ext> out;
  size_t pos = start;
  while (pos + 8 <= b.size()) {
    uint32_t type = Get32(b, pos), len = Get32(b, pos + 4);
    if (type == 0) break;
    REQUIRE(pos + 8 + len <= b.size());
    out.push_back({type, Bytes(b.begin() + ptrdiff_t(pos + 8), b.begin() + ptrdiff_t(pos + 8 + len)), pos});
    pos += 8 + ((len + 7) & ~size_t(7));
  }
  return out;
}

// A 1 GiB image with 64 KiB clusters, made by qemu-img (L1 at 0x30000, 2 entries).
Bytes DefaultImage(const TempDir& dir) {
  Qemu("qemu-img create -q -f qcow2 " + Sh(dir / "d.qcow2") + " 1G");
  Bytes b = ReadAll(dir / "d.qcow2");
  REQUIRE(Get32(b, kL1Size) == 2);
  return b;
}

// A header QEMU opens: qemu-img info on the file must succeed, and so must we.
void CheckAcceptedLikeQemu(const Bytes& file) {
  TempDir dir;
  const std::string path = dir / "accepted.qcow2";
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(file.data()), std::streamsize(file.size()));
  auto q = Run("qemu-img info " + Sh(path));
  CHECK_MESSAGE(q.exit_code == 0, "qemu-img info refuses it: ", q.err);
  auto r = ParseFile(file);
  CHECK_MESSAGE(r.ok(), r.status().message());
}

void CheckRejected(const Bytes& file, ErrorKind kind, const std::string& words) {
  auto r = ParseFile(file);
  REQUIRE_MESSAGE(!r.ok(), "expected a failure naming '", words, "'");
  CHECK_MESSAGE(r.status().kind() == kind, r.status().message());
  CHECK_MESSAGE(r.status().message().find(words) != std::string::npos, r.status().message());
}

}  // namespace

TEST_CASE("v3 round trip: backing file, backing format, feature names, dedup and unknown extensions") {
  const Header h = FullV3();
  auto enc = EncodeHeader(h);
  REQUIRE_MESSAGE(enc.ok(), enc.status().message());
  Bytes b = *enc;
  REQUIRE(b.size() <= h.cluster_size());

  // The raw layout, read by hand.
  CHECK(Get32(b, kMagic) == 0x514649fb);
  CHECK(Get32(b, kVersion) == 3);
  CHECK(Get32(b, kClusterBits) == 16);
  CHECK(Get64(b, kSize) == 3ull << 30);
  CHECK(Get32(b, kL1Size) == 8);
  CHECK(Get64(b, kL1Offset) == 0x40000);
  CHECK(Get64(b, kRefOffset) == 0x10000);
  CHECK(Get32(b, kRefClusters) == 2);
  CHECK(Get64(b, kIncompat) == (kIncompatDirty | kIncompatCompression));
  CHECK(Get64(b, kCompat) == kCompatLazyRefcounts);
  CHECK(Get64(b, kAutoclear) == kAutoclearDedupInSync);
  CHECK(Get32(b, kRefOrder) == 5);
  CHECK(Get32(b, kHeaderLength) == 112);
  CHECK(b[kCompressionType] == 1);
  const uint64_t bo = Get64(b, kBackingOffset);
  REQUIRE(Get32(b, kBackingSize) == h.backing_file.size());
  REQUIRE(bo + h.backing_file.size() <= b.size());
  CHECK(std::string(b.begin() + ptrdiff_t(bo), b.begin() + ptrdiff_t(bo + h.backing_file.size())) == h.backing_file);

  auto exts = WalkExtensions(b, 112);
  std::map<uint32_t, Bytes> by_type;
  for (auto& e : exts) {
    CHECK(e.at % 8 == 0);
    CHECK_MESSAGE(by_type.count(e.type) == 0, fmt::format("extension {:#x} twice", e.type));
    by_type[e.type] = e.data;
    CHECK(e.at < bo);  // extensions come before the backing file name
  }
  CHECK(by_type[kExtBackingFormat] == Bytes{'q', 'c', 'o', 'w', '2'});
  CHECK(by_type[0x12345678] == Bytes{1, 2, 3, 4, 5});  // verbatim, padding not included
  REQUIRE(by_type.count(0x0badcafe));
  CHECK(by_type[0x0badcafe].empty());
  REQUIRE(by_type[kExtFeatureNames].size() == 3 * 48);
  REQUIRE(by_type[kExtDedup].size() == 56);
  const Bytes& dd = by_type[kExtDedup];
  CHECK(Get32(dd, 0) == 3);  // extension version
  CHECK(Get32(dd, 4) == kHashSha256);
  CHECK(Get64(dd, 8) == 0x200000);
  CHECK(Get64(dd, 16) == 1234);
  CHECK(Get64(dd, 24) == 64);  // buckets
  CHECK(std::all_of(dd.begin() + 32, dd.end(), [](uint8_t b) { return b == 0; }));

  auto parsed = ParseHeader(b, 4u << 20);
  REQUIRE_MESSAGE(parsed.ok(), parsed.status().message());
  CheckSame(*parsed, h);
  CHECK(parsed->dedup_in_sync());

  // Encoding what was parsed gives the same bytes.
  auto again = EncodeHeader(*parsed);
  REQUIRE(again.ok());
  CHECK(*again == b);
}

TEST_CASE("v2 round trip: 72-byte header and a backing file name") {
  Header h;
  h.version = 2;
  h.cluster_bits = 12;
  h.virtual_size = 100 << 20;
  h.l1_size = 200;  // 100 MiB / (512 * 4 KiB) = 50 needed
  h.l1_offset = 0x3000;
  h.reftable_offset = 0x1000;
  h.reftable_clusters = 1;
  h.header_length = kV2HeaderLength;
  h.refcount_order = 4;
  h.backing_file = "/abs/path/base.raw";
  auto enc = EncodeHeader(h);
  REQUIRE(enc.ok());
  const Bytes& b = *enc;
  CHECK(Get32(b, kVersion) == 2);
  CHECK(Get64(b, kBackingOffset) >= 72);
  CHECK(Get32(b, kBackingSize) == h.backing_file.size());
  auto parsed = ParseHeader(b, 1u << 20);
  REQUIRE_MESSAGE(parsed.ok(), parsed.status().message());
  CHECK(parsed->version == 2);
  CHECK(parsed->header_length == 72);
  CHECK(parsed->refcount_order == 4);
  CHECK(parsed->incompatible == 0);
  CHECK(parsed->backing_file == h.backing_file);
  CHECK(parsed->l1_size == 200);
  CHECK(parsed->compression == CompressionType::kDeflate);
}

// qcow2.rst: header extensions follow the header in every version, and QEMU
// writes the backing format extension into v2 images (qemu-img create -o
// compat=0.10 -F raw does). Losing it means probing the backing file's format.
TEST_CASE("v2 round trip keeps the backing format extension") {
  Header h;
  h.version = 2;
  h.cluster_bits = 16;
  h.virtual_size = 1 << 20;
  h.l1_size = 1;
  h.l1_offset = 0x30000;
  h.reftable_offset = 0x10000;
  h.reftable_clusters = 1;
  h.header_length = kV2HeaderLength;
  h.backing_file = "base.raw";
  h.backing_format = "raw";
  auto enc = EncodeHeader(h);
  REQUIRE(enc.ok());
  auto parsed = ParseHeader(*enc, 1u << 20);
  REQUIRE(parsed.ok());
  CHECK(parsed->backing_file == "base.raw");
  CHECK(parsed->backing_format == std::optional<std::string>("raw"));
}

// qcow2.rst: "an unknown additional field may be safely ignored other than
// preserving its value when rewriting the image header"; QEMU 7.2 keeps such
// fields (seen: qemu-img amend keeps header_length 120 and bytes 112..119).
TEST_CASE("unknown additional header fields survive a rewrite") {
  Header h = FullV3();
  h.other_extensions.clear();
  h.dedup.reset();
  h.header_length = 120;
  auto enc = EncodeHeader(h);
  REQUIRE(enc.ok());
  Bytes b = *enc;
  CHECK(Get32(b, kHeaderLength) == 120);
  for (int i = 0; i < 8; ++i) b[112 + i] = uint8_t('A' + i);  // a future field
  auto parsed = ParseHeader(b, 4u << 20);
  REQUIRE_MESSAGE(parsed.ok(), parsed.status().message());
  CHECK(parsed->header_length == 120);
  CHECK(parsed->backing_format == std::optional<std::string>("qcow2"));
  auto again = EncodeHeader(*parsed);
  REQUIRE(again.ok());
  REQUIRE(again->size() >= 120);
  CHECK(Bytes(again->begin() + 112, again->begin() + 120) == Bytes(b.begin() + 112, b.begin() + 120));
}

TEST_CASE("a short dedup extension is kept as an unknown one") {
  Header h = FullV3();
  h.dedup.reset();
  h.other_extensions = {{kExtDedup, Bytes(20, 7)}};
  auto enc = EncodeHeader(h);
  REQUIRE(enc.ok());
  auto parsed = ParseHeader(*enc, 4u << 20);
  REQUIRE(parsed.ok());
  CHECK_FALSE(parsed->dedup.has_value());
  CHECK_FALSE(parsed->dedup_in_sync());
  REQUIRE(parsed->other_extensions.size() == 1);
  CHECK(parsed->other_extensions[0].second == Bytes(20, 7));
}

// Found by write_fuzz: an image whose dedup extension was too short to be
// ours, opened for writing and closed, had the extension twice (the kept
// short one and the new index's), and did not open again.
TEST_CASE("a short dedup extension gives way to the index written over it") {
  Header h = FullV3();
  REQUIRE(h.dedup.has_value());
  h.other_extensions = {{kExtDedup, Bytes(55, 7)}, {0x12345678, {1, 2, 3}}};
  auto enc = EncodeHeader(h);
  REQUIRE(enc.ok());
  auto parsed = ParseHeader(*enc, 4u << 20);
  REQUIRE_MESSAGE(parsed.ok(), parsed.status().message());
  REQUIRE(parsed->dedup.has_value());
  CHECK(parsed->dedup->index_offset == h.dedup->index_offset);
  REQUIRE(parsed->other_extensions.size() == 1);
  CHECK(parsed->other_extensions[0].first == 0x12345678u);
}

TEST_CASE("EncodeHeader refuses what does not fit in cluster 0") {
  Header h = FullV3();
  h.cluster_bits = 9;
  h.backing_file = std::string(400, 'b');
  auto enc = EncodeHeader(h);
  REQUIRE_FALSE(enc.ok());
  CHECK(enc.status().kind() == ErrorKind::kInvalidArgument);
  h.cluster_bits = 16;
  h.backing_file = std::string(1024, 'b');
  CHECK_FALSE(EncodeHeader(h).ok());
  h.backing_file = std::string(1023, 'b');
  CHECK(EncodeHeader(h).ok());
}

TEST_CASE("L1EntriesFor") {
  Header h;
  h.cluster_bits = 16;  // an L2 table maps 8192 * 64 KiB = 512 MiB
  CHECK(L1EntriesFor(0, h) == 0);
  CHECK(L1EntriesFor(1, h) == 1);
  CHECK(L1EntriesFor(512ull << 20, h) == 1);
  CHECK(L1EntriesFor((512ull << 20) + 1, h) == 2);
  h.incompatible = kIncompatExtendedL2;  // 4096 entries of 16 bytes
  CHECK(L1EntriesFor((256ull << 20) + 1, h) == 2);
  h.incompatible = 0;
  h.cluster_bits = 9;  // 64 * 512 = 32 KiB
  CHECK(L1EntriesFor(1ull << 30, h) == 32768);
}

// ---------------------------------------------------------------------------
// Images written by stock qemu-img: what ParseHeader decodes is what
// qemu-img info reports.

struct QemuCase {
  std::string opts;
  std::string size;
  bool backing = false;      // -b base.qcow2 -F qcow2
  bool raw_backing = false;  // -b base.raw -F raw
};

TEST_CASE("images from qemu-img create decode as qemu-img info reports them") {
  RequireQemu();
  TempDir dir;
  Qemu("qemu-img create -q -f qcow2 " + Sh(dir / "base.qcow2") + " 1M");
  Qemu("qemu-img create -q -f raw " + Sh(dir / "base.raw") + " 1M");
  const std::vector<QemuCase> cases = {
      {"", "1G"},
      {"compat=0.10", "1G"},
      {"compat=0.10,cluster_size=4096", "100M"},
      {"cluster_size=512", "64M"},
      {"cluster_size=1024", "3G"},
      {"cluster_size=4096", "10G"},
      {"cluster_size=65536", "1T"},
      {"cluster_size=1M", "10T"},
      {"cluster_size=2M", "100T"},
      {"refcount_bits=1", "1G"},
      {"refcount_bits=2", "1G"},
      {"refcount_bits=4", "1G"},
      {"refcount_bits=8", "1G"},
      {"refcount_bits=32", "1G"},
      {"refcount_bits=64,cluster_size=512", "16M"},
      {"extended_l2=on", "1G"},
      {"extended_l2=on,cluster_size=16K", "1G"},
      {"extended_l2=on,cluster_size=2M", "1T"},
      {"compression_type=zstd", "1G"},
      {"lazy_refcounts=on", "1G"},
      {"lazy_refcounts=on,compression_type=zstd,extended_l2=on,refcount_bits=64", "123456789"},
      {"", "1G", true},
      {"cluster_size=512", "1M", true},
      {"compat=0.10", "1M", true},
      {"", "10M", false, true},
      {"compat=0.10", "10M", false, true},
  };
  for (const auto& c : cases) {
    const std::string img = dir / "t.qcow2";
    std::string cmd = "cd " + Sh(dir.path()) + " && qemu-img create -q -f qcow2";
    if (!c.opts.empty()) cmd += " -o " + c.opts;
    if (c.backing) cmd += " -b base.qcow2 -F qcow2";
    if (c.raw_backing) cmd += " -b base.raw -F raw";
    cmd += " t.qcow2 " + c.size;
    CAPTURE(cmd);
    Qemu("rm -f " + Sh(img) + " && " + cmd);
    auto info_run = Run("qemu-img info --output=json " + Sh(img));
    REQUIRE(info_run.exit_code == 0);
    auto info = nlohmann::json::parse(info_run.out);
    const auto& data = info["format-specific"]["data"];
    const Bytes file = ReadAll(img);
    auto r = ParseFile(file);
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    const Header& h = *r;
    CHECK(h.virtual_size == info["virtual-size"].get<uint64_t>());
    CHECK(h.cluster_size() == info["cluster-size"].get<uint64_t>());
    CHECK(h.version == (data["compat"] == "0.10" ? 2u : 3u));
    CHECK(h.refcount_bits() == data["refcount-bits"].get<uint32_t>());
    CHECK((h.compression == CompressionType::kZstd ? "zstd" : "zlib") == data["compression-type"].get<std::string>());
    CHECK(bool(h.incompatible & kIncompatDirty) == info["dirty-flag"].get<bool>());
    if (data.contains("lazy-refcounts")) CHECK(h.lazy_refcounts() == data["lazy-refcounts"].get<bool>());
    if (data.contains("extended-l2")) CHECK(h.extended_l2() == data["extended-l2"].get<bool>());
    if (data.contains("corrupt")) CHECK(bool(h.incompatible & kIncompatCorrupt) == data["corrupt"].get<bool>());
    if (info.contains("backing-filename")) {
      CHECK(h.backing_file == info["backing-filename"].get<std::string>());
    } else {
      CHECK(h.backing_file.empty());
    }
    if (info.contains("backing-filename-format")) {
      CHECK(h.backing_format == std::optional<std::string>(info["backing-filename-format"].get<std::string>()));
    } else {
      CHECK_FALSE(h.backing_format.has_value());
    }
    // What qemu-img info does not print, checked against the raw bytes.
    CHECK(h.l1_size == Get32(file, kL1Size));
    CHECK(h.l1_size >= L1EntriesFor(h.virtual_size, h));
    CHECK(h.l1_offset == Get64(file, kL1Offset));
    CHECK(h.reftable_offset == Get64(file, kRefOffset));
    CHECK(h.reftable_clusters == Get32(file, kRefClusters));
    CHECK(h.nb_snapshots == 0);
    CHECK(h.other_extensions.empty());  // QEMU writes only extensions we know
    CHECK_FALSE(h.dedup.has_value());
    if (h.version == 3) {
      CHECK(h.header_length == Get32(file, kHeaderLength));
      CHECK(h.incompatible == Get64(file, kIncompat));
    } else {
      CHECK(h.header_length == 72);
      CHECK(h.refcount_order == 4);
    }
    // The extensions QEMU wrote (it leaves the feature name table out of
    // small clusters), walked by hand, against what was decoded.
    const size_t ext_end = h.backing_file.empty() ? h.cluster_size() : Get64(file, kBackingOffset);
    bool saw_features = false;
    for (const Ext& e : WalkExtensions(Bytes(file.begin(), file.begin() + ptrdiff_t(ext_end)), h.header_length)) {
      CAPTURE(e.type);
      if (e.type == kExtFeatureNames) {
        saw_features = true;
        CHECK(h.feature_names.size() == e.data.size() / 48);
        CHECK(h.feature_names.at({0, 0}) == "dirty bit");
        CHECK(h.feature_names.at({1, 0}) == "lazy refcounts");
      } else if (e.type == kExtBackingFormat) {
        CHECK(h.backing_format == std::optional<std::string>(std::string(e.data.begin(), e.data.end())));
      } else {
        FAIL_CHECK("an extension qemu-img create is not expected to write");
      }
    }
    if (!saw_features) CHECK(h.feature_names.empty());
    // Re-encoding QEMU's header keeps what QEMU wrote (up to the backing name).
    auto enc = EncodeHeader(h);
    REQUIRE(enc.ok());
    auto back = ParseHeader(*enc, file.size());
    REQUIRE_MESSAGE(back.ok(), back.status().message());
    CheckSame(*back, h);
  }
}

// ---------------------------------------------------------------------------
// Rejections: the right kind and a message that names the problem.

TEST_CASE("rejections of damaged headers") {
  RequireQemu();
  TempDir dir;
  const Bytes good = DefaultImage(dir);
  REQUIRE(ParseFile(good).ok());
  const uint64_t cs = 65536;
  Bytes b = good;

  SUBCASE("bad magic") {
    b[3] = 0xfc;
    CheckRejected(b, ErrorKind::kCorruption, "magic");
  }
  SUBCASE("version 1") {
    Put32(b, kVersion, 1);
    CheckRejected(b, ErrorKind::kUnsupported, "version 1");
  }
  SUBCASE("version 4") {
    Put32(b, kVersion, 4);
    CheckRejected(b, ErrorKind::kUnsupported, "version 4");
  }
  SUBCASE("cluster_bits 8: below the format's minimum") {
    Put32(b, kClusterBits, 8);
    CheckRejected(b, ErrorKind::kCorruption, "cluster_bits 8");
  }
  SUBCASE("cluster_bits 0 and 64") {
    Put32(b, kClusterBits, 0);
    CheckRejected(b, ErrorKind::kCorruption, "cluster_bits 0");
    Put32(b, kClusterBits, 64);
    CHECK_FALSE(ParseFile(b).ok());
  }
  SUBCASE("cluster_bits 22: valid qcow2 beyond QEMU's 2 MiB limit, so Unsupported") {
    // qcow2.rst sets no maximum; only QEMU's implementation stops at 2 MiB.
    Put32(b, kClusterBits, 22);
    CheckRejected(b, ErrorKind::kUnsupported, "cluster_bits 22");
  }
  SUBCASE("header_length 100") {
    Put32(b, kHeaderLength, 100);
    CheckRejected(b, ErrorKind::kCorruption, "header_length 100");
  }
  SUBCASE("odd header_length") {
    Put32(b, kHeaderLength, 113);
    CheckRejected(b, ErrorKind::kCorruption, "header_length 113");
  }
  SUBCASE("header_length not a multiple of 8") {
    Put32(b, kHeaderLength, 108);
    CheckRejected(b, ErrorKind::kCorruption, "header_length 108");
  }
  SUBCASE("header_length larger than the cluster") {
    Put32(b, kHeaderLength, uint32_t(cs + 8));
    CheckRejected(b, ErrorKind::kCorruption, fmt::format("header_length {}", cs + 8));
    Put32(b, kHeaderLength, 0xfffffff8u);
    CheckRejected(b, ErrorKind::kCorruption, "header_length");
  }
  SUBCASE("refcount_order 7") {
    Put32(b, kRefOrder, 7);
    CheckRejected(b, ErrorKind::kCorruption, "refcount_order 7");
  }
  SUBCASE("l1_size too small for the virtual size") {
    Put32(b, kL1Size, 1);
    CheckRejected(b, ErrorKind::kCorruption, "too small");
    Put32(b, kL1Size, 0);
    CheckRejected(b, ErrorKind::kCorruption, "too small");
  }
  SUBCASE("l1_size above QEMU's 32 MiB limit") {
    Put32(b, kL1Size, (32u << 20) / 8 + 1);
    CheckRejected(b, ErrorKind::kCorruption, "too large");
    Put32(b, kL1Size, 0xffffffffu);
    CheckRejected(b, ErrorKind::kCorruption, "too large");
  }
  SUBCASE("l1_size at the limit, beyond the end of the file: read as zeros, as QEMU does") {
    Put32(b, kL1Size, (32u << 20) / 8);
    CheckAcceptedLikeQemu(b);
  }
  SUBCASE("L1 table offset misaligned") {
    Put64(b, kL1Offset, 0x30000 + 512);
    CheckRejected(b, ErrorKind::kCorruption, "not cluster aligned");
    Put64(b, kL1Offset, 0x30008);
    CheckRejected(b, ErrorKind::kCorruption, "L1 table");
  }
  SUBCASE("L1 table beyond the end of the file: read as zeros, as QEMU does") {
    Put64(b, kL1Offset, 0x100000);
    CheckAcceptedLikeQemu(b);
  }
  SUBCASE("L1 table beyond what an image can address") {
    Put64(b, kL1Offset, 0xffffffffffff0000ull);  // no overflow into the file
    CheckRejected(b, ErrorKind::kCorruption, "L1 table");
  }
  SUBCASE("L1 table over the header") {
    Put64(b, kL1Offset, 0);
    CheckRejected(b, ErrorKind::kCorruption, "L1 table");
  }
  SUBCASE("refcount table offset misaligned") {
    Put64(b, kRefOffset, 0x10000 + 4096);
    CheckRejected(b, ErrorKind::kCorruption, "not cluster aligned");
  }
  SUBCASE("refcount table beyond the end of the file: read as zeros, as QEMU does") {
    Put64(b, kRefOffset, 0x40000);
    CheckAcceptedLikeQemu(b);
    Put64(b, kRefOffset, 0x10000);
    Put32(b, kRefClusters, 4);  // 0x10000 + 4 clusters > 0x30010
    CheckAcceptedLikeQemu(b);
  }
  SUBCASE("tables over the header: decoded and valid for QEMU, refused for our use") {
    Put64(b, kL1Offset, 0);
    Put32(b, kRefClusters, 0);
    std::span<const uint8_t> head(b.data(), std::min<size_t>(b.size(), cs));
    auto h = DecodeHeader(head);
    REQUIRE_MESSAGE(h.ok(), h.status().message());
    CHECK(h->l1_offset == 0);  // as on disk: nothing patched
    CHECK(h->reftable_clusters == 0);
    CHECK(ValidateHeader(*h).ok());
    const Status placed = CheckUsable(*h, b.size());
    CHECK(placed.kind() == ErrorKind::kCorruption);
    CHECK(placed.message().find("L1 table") != std::string::npos);
  }
  SUBCASE("empty or oversized refcount table") {
    Put32(b, kRefClusters, 0);
    CheckRejected(b, ErrorKind::kCorruption, "refcount table");
    Put32(b, kRefClusters, (8u << 20) / 65536 + 1);
    CheckRejected(b, ErrorKind::kCorruption, "too large");
  }
  SUBCASE("absurd virtual size") {
    Put64(b, kSize, 1ull << 62);
    CheckRejected(b, ErrorKind::kCorruption, "virtual size");
    Put64(b, kSize, ~0ull);
    CheckRejected(b, ErrorKind::kCorruption, "virtual size");
  }
  SUBCASE("backing file name outside cluster 0") {
    Put64(b, kBackingOffset, cs - 4);
    Put32(b, kBackingSize, 10);
    CheckRejected(b, ErrorKind::kCorruption, "backing file name");
    Put64(b, kBackingOffset, cs);
    Put32(b, kBackingSize, 1);
    CheckRejected(b, ErrorKind::kCorruption, "backing file name");
    Put64(b, kBackingOffset, 0xffffffffffffff00ull);  // would wrap around
    Put32(b, kBackingSize, 0x200);
    CheckRejected(b, ErrorKind::kCorruption, "backing file name");
  }
  SUBCASE("backing file name longer than 1023 bytes") {
    Put64(b, kBackingOffset, 0x1000);
    Put32(b, kBackingSize, 1024);
    CheckRejected(b, ErrorKind::kCorruption, "backing file name");
  }
  SUBCASE("backing file name inside the header fields") {
    Put64(b, kBackingOffset, 40);
    Put32(b, kBackingSize, 8);
    CheckRejected(b, ErrorKind::kCorruption, "backing file name");
  }
  SUBCASE("extension length runs past the header") {
    REQUIRE(Get32(b, 112) == kExtFeatureNames);
    Put32(b, 116, uint32_t(cs));
    CheckRejected(b, ErrorKind::kCorruption, "6803f857");
    Put32(b, 116, 0xfffffff8u);  // 32-bit wrap-around in a careless sum
    CheckRejected(b, ErrorKind::kCorruption, "runs past");
  }
  SUBCASE("extension length runs into the backing file name") {
    // The name sits at 0x300; extensions must end before it.
    const std::string name = "base.qcow2";
    std::copy(name.begin(), name.end(), b.begin() + 0x300);
    Put64(b, kBackingOffset, 0x300);
    Put32(b, kBackingSize, uint32_t(name.size()));
    REQUIRE(ParseFile(b).ok());
    Put32(b, 116, 0x300 - 112 - 8 + 8);
    CheckRejected(b, ErrorKind::kCorruption, "runs past");
  }
  SUBCASE("duplicate extension") {
    std::fill(b.begin() + 112, b.begin() + 1024, 0);
    for (size_t at : {112, 128}) {
      Put32(b, at, kExtBackingFormat);
      Put32(b, at + 4, 3);
      b[at + 8] = 'r', b[at + 9] = 'a', b[at + 10] = 'w';
    }
    CheckRejected(b, ErrorKind::kCorruption, "twice");
  }
  SUBCASE("unknown incompatible bit without a name") {
    Put64(b, kIncompat, 1ull << 20);
    CheckRejected(b, ErrorKind::kUnsupported, "20");
  }
  SUBCASE("unknown incompatible bit named in the feature name table") {
    // Turn QEMU's table entry for autoclear bit 0 ("bitmaps") into one for
    // incompatible bit 20.
    const uint32_t len = Get32(b, 116);
    bool renamed = false;
    for (size_t e = 120; e + 48 <= 120 + len; e += 48) {
      if (b[e] == 2 && b[e + 1] == 0) {
        std::fill(b.begin() + ptrdiff_t(e), b.begin() + ptrdiff_t(e + 48), 0);
        b[e] = 0;
        b[e + 1] = 20;
        const std::string name = "frobnicated clusters";
        std::copy(name.begin(), name.end(), b.begin() + ptrdiff_t(e + 2));
        renamed = true;
      }
    }
    REQUIRE(renamed);
    Put64(b, kIncompat, 1ull << 20);
    CheckRejected(b, ErrorKind::kUnsupported, "frobnicated clusters");
    // Together with a known bit, the unknown one is still the one named.
    Put64(b, kIncompat, 1ull << 20 | kIncompatDirty);
    CheckRejected(b, ErrorKind::kUnsupported, "frobnicated clusters");
  }
  SUBCASE("unknown incompatible bit 63") {
    Put64(b, kIncompat, 1ull << 63);
    CheckRejected(b, ErrorKind::kUnsupported, "63");
  }
  SUBCASE("compression type without its bit, and the bit without a type") {
    b[kCompressionType] = 1;
    CheckRejected(b, ErrorKind::kCorruption, "compression");
    b[kCompressionType] = 0;
    Put64(b, kIncompat, kIncompatCompression);
    CheckRejected(b, ErrorKind::kCorruption, "compression");
  }
  SUBCASE("extended L2 entries with clusters below 16 KiB") {
    Qemu("qemu-img create -q -f qcow2 -o cluster_size=4096 " + Sh(dir / "s.qcow2") + " 1M");
    Bytes s = ReadAll(dir / "s.qcow2");
    Put64(s, kIncompat, kIncompatExtendedL2);
    CheckRejected(s, ErrorKind::kCorruption, "extended L2");
  }
  SUBCASE("encryption and external data files are unsupported") {
    Put32(b, kCrypt, 2);
    CheckRejected(b, ErrorKind::kUnsupported, "encrypt");
    Put32(b, kCrypt, 0);
    Put64(b, kIncompat, kIncompatDataFile);
    CheckRejected(b, ErrorKind::kUnsupported, "external data file");
  }
  SUBCASE("a file too short for any header") {
    CheckRejected(Bytes(good.begin(), good.begin() + 71), ErrorKind::kCorruption, "too short");
    CheckRejected(Bytes(), ErrorKind::kCorruption, "too short");
  }
}

// Every cut of the first cluster either parses or fails with a message;
// none crashes or reads past the buffer (run under ASan to make that count).
TEST_CASE("a header cut at every length parses or fails cleanly") {
  RequireQemu();
  TempDir dir;
  Qemu("qemu-img create -q -f raw " + Sh(dir / "base.raw") + " 1M");
  struct Source {
    std::string opts;
    bool backing;
  };
  for (const Source& src : std::vector<Source>{{"cluster_size=4096", true},
                                               {"compat=0.10,cluster_size=1024", true},
                                               {"cluster_size=512", false},
                                               {"", true}}) {
    CAPTURE(src.opts);
    std::string cmd = "cd " + Sh(dir.path()) + " && rm -f c.qcow2 && qemu-img create -q -f qcow2";
    if (!src.opts.empty()) cmd += " -o " + src.opts;
    if (src.backing) cmd += " -b base.raw -F raw";
    Qemu(cmd + " c.qcow2 1M");
    const Bytes file = ReadAll(dir / "c.qcow2");
    auto whole = ParseFile(file);
    REQUIRE_MESSAGE(whole.ok(), whole.status().message());
    const size_t cs = whole->cluster_size();
    size_t parsed = 0, failed = 0;
    for (size_t n = 0; n <= std::min(cs, file.size()); ++n) {
      CAPTURE(n);
      // A file that ends at n: its tables lie beyond the end.
      Bytes cut(file.begin(), file.begin() + ptrdiff_t(n));
      auto r = ParseHeader(cut, n);
      if (r.ok()) {
        ++parsed;
      } else {
        ++failed;
        CHECK(!r.status().message().empty());
        CHECK((r.status().kind() == ErrorKind::kCorruption || r.status().kind() == ErrorKind::kUnsupported));
      }
      if (n < 72) CHECK(!r.ok());
      // The buffer cut, the file not (a short read): parses once the
      // header, its extensions and the backing file name are all there.
      auto r2 = ParseHeader(cut, file.size());
      if (!r2.ok()) {
        CHECK(!r2.status().message().empty());
      } else {
        CHECK(r2->virtual_size == whole->virtual_size);
        CHECK(r2->backing_file == whole->backing_file);
      }
    }
    CHECK(failed > 0);
    (void)parsed;
  }
}

TEST_CASE("internal snapshots: the snapshot table is located and vetted") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "s.qcow2";
  Qemu("qemu-img create -q -f qcow2 " + Sh(img) + " 1G && qemu-img snapshot -c one " + Sh(img) +
       " && qemu-img snapshot -c two " + Sh(img));
  Bytes b = ReadAll(img);
  auto r = ParseFile(b);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  CHECK(r->nb_snapshots == 2);
  CHECK(r->snapshots_offset == Get64(b, kSnapOffset));
  CHECK(r->snapshots_offset % 65536 == 0);
  SUBCASE("misaligned") {
    Put64(b, kSnapOffset, Get64(b, kSnapOffset) + 8);
    CheckRejected(b, ErrorKind::kCorruption, "snapshot table");
  }
  SUBCASE("beyond the end of the file") {
    Put64(b, kSnapOffset, 1ull << 40);
    CheckRejected(b, ErrorKind::kCorruption, "snapshot table");
  }
  SUBCASE("over the header") {
    Put64(b, kSnapOffset, 0);
    CheckRejected(b, ErrorKind::kCorruption, "snapshot table");
  }
  SUBCASE("more snapshots than QEMU allows") {
    Put32(b, kNbSnapshots, 65537);
    CheckRejected(b, ErrorKind::kCorruption, "snapshots");
  }
}
