// image/cluster_map: Lookup plans on images written by qemu-img and qemu-io,
// judged by `qemu-img map`, and refusals of damaged L1/L2 entries.
#include "image/cluster_map.h"

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "format/compression.h"
#include "image/image_state.h"
#include "qcow2dedup/image.h"
#include "support/process.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Run;
using testing::Sh;
using testing::TempDir;

namespace {

using Bytes = std::vector<uint8_t>;

void Must(const std::string& cmd) {
  auto r = Run(cmd);
  REQUIRE_MESSAGE(r.exit_code == 0, cmd, "\n", r.out, r.err);
}

void QemuIo(const std::string& img, const std::vector<std::string>& cmds) {
  std::string c = "qemu-io -f qcow2";
  for (auto& x : cmds) c += " -c " + Sh(x);
  Must(c + " " + Sh(img) + " >/dev/null");
}

Bytes ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE(f.good());
  return Bytes(std::istreambuf_iterator<char>(f), {});
}

uint64_t Be(const Bytes& b, size_t at) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | b.at(at + i);
  return v;
}

void PutBe64(const std::string& path, uint64_t at, uint64_t v) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  REQUIRE(f.good());
  uint8_t b[8];
  StoreBe64(b, v);
  f.seekp(std::streamoff(at));
  f.write(reinterpret_cast<const char*>(b), 8);
}

// Where guest cluster g's L2 entry sits in the file (by hand from qcow2.rst).
uint64_t L2EntryOffset(const std::string& path, uint64_t g) {
  const Bytes f = ReadAll(path);
  const uint32_t cb = uint32_t(Be(f, 16) & 0xffffffff);  // bytes 20..23
  const uint64_t cs = 1ull << cb;
  const bool ext = Be(f, 72) & (1ull << 4);
  const uint64_t entry = ext ? 16 : 8, per = cs / entry;
  const uint64_t l1 = Be(f, 40);
  const uint64_t l2 = Be(f, l1 + 8 * (g / per)) & kOffsetMask;
  REQUIRE(l2 != 0);
  return l2 + entry * (g % per);
}

std::unique_ptr<Image> OpenRO(const std::string& path) {
  auto img = Image::Open(path, {});
  REQUIRE_MESSAGE(img.ok(), img.status().message());
  return std::move(img).value();
}

struct MapRange {
  uint64_t start, length;
  bool present, zero, data;
  std::optional<uint64_t> offset;
};

std::vector<MapRange> QemuMap(const std::string& path) {
  auto r = Run("qemu-img map -f qcow2 --output=json " + Sh(path));
  REQUIRE(r.exit_code == 0);
  std::vector<MapRange> out;
  for (auto& j : nlohmann::json::parse(r.out)) {
    MapRange m{j["start"], j["length"], j["present"], j["zero"], j["data"], std::nullopt};
    if (j.contains("offset")) m.offset = j["offset"].get<uint64_t>();
    out.push_back(m);
  }
  return out;
}

const char* KindName(ClusterKind k) {
  switch (k) {
    case ClusterKind::kUnallocated: return "unallocated";
    case ClusterKind::kZero: return "zero";
    case ClusterKind::kData: return "data";
    case ClusterKind::kCompressed: return "compressed";
  }
  return "?";
}

// Lookup at guest offset g agrees with qemu-img map.
void CheckAgainstMap(ClusterMap& map, const Header& h, const std::vector<MapRange>& ranges, uint64_t g) {
  CAPTURE(g);
  const MapRange* m = nullptr;
  for (auto& r : ranges)
    if (g >= r.start && g < r.start + r.length) m = &r;
  REQUIRE(m);
  auto plan = map.Lookup(g);
  REQUIRE_MESSAGE(plan.ok(), plan.status().message());
  CAPTURE(KindName(plan->kind));
  const uint64_t cs = h.cluster_size();
  if (!m->present) {
    CHECK(plan->kind == ClusterKind::kUnallocated);
  } else if (!m->data) {
    CHECK(plan->kind == ClusterKind::kZero);
  } else if (m->offset) {
    REQUIRE(plan->kind == ClusterKind::kData);
    CHECK(plan->host_offset == *m->offset + (g - m->start));
  } else {
    REQUIRE(plan->kind == ClusterKind::kCompressed);
    CHECK(IsCompressed(plan->entry));
  }
  // A plan covers the rest of its cluster, or of its subcluster with
  // extended L2 entries (compressed clusters have no subclusters).
  const uint64_t unit = h.extended_l2() && plan->kind != ClusterKind::kCompressed ? cs / 32 : cs;
  CHECK(plan->length == unit - g % unit);
}

void CheckImage(const std::string& path, uint64_t step, uint64_t limit) {
  auto img = OpenRO(path);
  ImageState& s = StateOf(*img);
  const auto ranges = QemuMap(path);
  for (uint64_t g = 0; g < std::min(limit, s.header.virtual_size); g += step) CheckAgainstMap(*s.map, s.header, ranges, g);
  // And a few offsets inside clusters and near the end.
  for (uint64_t g : {uint64_t(1), uint64_t(511), uint64_t(4097), s.header.virtual_size - 1,
                     s.header.virtual_size - s.header.cluster_size()})
    CheckAgainstMap(*s.map, s.header, ranges, g);
}

}  // namespace

TEST_CASE("Lookup on a v3 image: data, unallocated, zero, zero-allocated, compressed, two L2 tables") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  Must("qemu-img create -q -f qcow2 " + Sh(img) + " 1G");
  QemuIo(img, {"write -P 0xaa 0 64k", "write -z 128k 64k", "write -P 0x1 192k 64k", "write -z 192k 64k",
               "write -c -P 0xcc 256k 64k", "write -P 0xbb 335872 4k", "write -P 0xdd 600M 64k"});
  CheckImage(img, 4096, 1 << 20);
  auto image = OpenRO(img);
  ImageState& s = StateOf(*image);
  ClusterMap& map = *s.map;
  const Bytes file = ReadAll(img);
  const uint64_t cs = 65536;

  SUBCASE("data: the host offset of each byte, and the bytes there") {
    auto p = map.Lookup(100);
    REQUIRE(p.ok());
    CHECK(p->kind == ClusterKind::kData);
    CHECK(p->host_offset % cs == 100);
    CHECK(p->length == cs - 100);
    CHECK(file.at(p->host_offset) == 0xaa);
    CHECK((p->entry & kFlagCopied) != 0);  // refcount 1
    CHECK(L2Offset(p->entry) == p->host_offset - 100);
    auto q = map.Lookup(600ull << 20);
    REQUIRE(q.ok());
    CHECK(q->kind == ClusterKind::kData);
    CHECK(file.at(q->host_offset) == 0xdd);
    CHECK(map.l1().size() == 2);
  }
  SUBCASE("a partial write allocates the whole cluster") {
    auto p = map.Lookup(335872);
    REQUIRE(p.ok());
    CHECK(p->kind == ClusterKind::kData);
    CHECK(file.at(p->host_offset) == 0xbb);
    auto q = map.Lookup(5 * cs);
    REQUIRE(q.ok());
    CHECK(q->kind == ClusterKind::kData);
    CHECK(q->host_offset + 8192 == p->host_offset);
  }
  SUBCASE("zero clusters, with and without a host cluster") {
    auto p = map.Lookup(2 * cs + 5);
    REQUIRE(p.ok());
    CHECK(p->kind == ClusterKind::kZero);
    CHECK(p->entry == kFlagZero);
    auto q = map.Lookup(3 * cs);
    REQUIRE(q.ok());
    CHECK(q->kind == ClusterKind::kZero);
    CHECK(L2Offset(q->entry) != 0);  // QEMU kept the allocation
    CHECK(q->host_offset == 0);
  }
  SUBCASE("compressed: the descriptor decompresses to the data") {
    auto p = map.Lookup(4 * cs + 7);
    REQUIRE(p.ok());
    REQUIRE(p->kind == ClusterKind::kCompressed);
    CHECK(p->length == cs - 7);
    const CompressedDescriptor d = DecodeCompressed(p->entry, 16);
    Bytes in(d.bytes, 0);
    for (uint64_t i = 0; i < d.bytes && d.offset + i < file.size(); ++i) in[i] = file[d.offset + i];
    Bytes out(cs);
    REQUIRE(Decompress(CompressionType::kDeflate, in, out).ok());
    CHECK(out == Bytes(cs, 0xcc));
  }
  SUBCASE("unallocated: never written, and no L2 table at all") {
    auto p = map.Lookup(cs + 3);
    REQUIRE(p.ok());
    CHECK(p->kind == ClusterKind::kUnallocated);
    CHECK(p->entry == 0);
    CHECK(p->length == cs - 3);
    auto q = map.Lookup(900ull << 20);
    REQUIRE(q.ok());
    CHECK(q->kind == ClusterKind::kUnallocated);
    CHECK(L1Offset(map.l1()[1]) != 0);
    auto r = map.Lookup((1ull << 30) - 1);
    REQUIRE(r.ok());
    CHECK(r->kind == ClusterKind::kUnallocated);
    CHECK(r->length == 1);
  }
  SUBCASE("GetEntry gives the raw L2 entries") {
    for (uint64_t g = 0; g < 6; ++g) {
      auto e = map.GetEntry(g);
      REQUIRE(e.ok());
      CHECK(*e == Be(file, L2EntryOffset(img, g)));
    }
    CHECK(*map.GetEntry((900ull << 20) / cs) == 0);
  }
}

TEST_CASE("Lookup on an image with extended L2 entries: subclusters") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  const std::string img = dir / "e.qcow2";
  Must("qemu-img create -q -f qcow2 -o extended_l2=on " + Sh(img) + " 1M");
  QemuIo(img, {"write -P 0x11 0 4k", "write -z 8k 2k", "write -P 0x22 129024 2k", "write -c -P 0x33 128k 64k"});
  CheckImage(img, 1024, 1 << 20);
  auto image = OpenRO(img);
  ClusterMap& map = *StateOf(*image).map;
  const Bytes file = ReadAll(img);
  // Subclusters of 2 KiB: 0 and 1 allocated, 2 and 3 not, 4 zero.
  auto a = map.Lookup(2048 + 10);
  REQUIRE(a.ok());
  CHECK(a->kind == ClusterKind::kData);
  CHECK(a->length == 2048 - 10);
  CHECK(file.at(a->host_offset) == 0x11);
  auto b = map.Lookup(4096);
  REQUIRE(b.ok());
  CHECK(b->kind == ClusterKind::kUnallocated);
  CHECK(b->length == 2048);
  auto z = map.Lookup(8192 + 100);
  REQUIRE(z.ok());
  CHECK(z->kind == ClusterKind::kZero);
  CHECK(z->length == 1948);
  // Cluster 1: only its last subcluster holds data. Cluster 2 is compressed.
  auto last = map.Lookup(129024);
  REQUIRE(last.ok());
  CHECK(last->kind == ClusterKind::kData);
  CHECK(file.at(last->host_offset) == 0x22);
  auto c = map.Lookup(131072 + 5000);
  REQUIRE(c.ok());
  CHECK(c->kind == ClusterKind::kCompressed);
  CHECK(c->length == 65536 - 5000);
}

TEST_CASE("Lookup on a v2 image") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  const std::string img = dir / "v2.qcow2";
  Must("qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 " + Sh(img) + " 1M");
  QemuIo(img, {"write -P 0x44 0 64k", "write -z 64k 64k", "write -c -P 0x55 128k 4k"});
  CheckImage(img, 2048, 1 << 20);
}

TEST_CASE("Lookup on an overlay: what the backing file holds is unallocated here") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  Must("qemu-img create -q -f qcow2 " + Sh(dir / "base.qcow2") + " 4M");
  QemuIo(dir / "base.qcow2", {"write -P 0x66 0 1M"});
  Must("cd " + Sh(dir.path()) + " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 4M");
  QemuIo(dir / "top.qcow2", {"write -P 0x77 64k 64k", "write -z 128k 64k"});
  auto image = OpenRO(dir / "top.qcow2");
  ClusterMap& map = *StateOf(*image).map;
  CHECK(map.Lookup(0)->kind == ClusterKind::kUnallocated);
  CHECK(map.Lookup(65536)->kind == ClusterKind::kData);
  CHECK(map.Lookup(131072)->kind == ClusterKind::kZero);  // zero, not the backing file's data
  CHECK(map.Lookup(196608)->kind == ClusterKind::kUnallocated);
}

TEST_CASE("Lookup refuses damaged L2 entries") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  const std::string img = dir / "d.qcow2";
  Must("qemu-img create -q -f qcow2 " + Sh(img) + " 1M");
  QemuIo(img, {"write -P 0xaa 0 64k", "write -c -P 0xcc 64k 64k"});
  const uint64_t at0 = L2EntryOffset(img, 0), at1 = L2EntryOffset(img, 1);
  const Bytes file = ReadAll(img);
  const uint64_t e0 = Be(file, at0), e1 = Be(file, at1);
  const uint64_t size = file.size();
  REQUIRE(IsCompressed(e1));
  auto expect = [&](uint64_t at, uint64_t entry, uint64_t guest, const std::string& words) {
    PutBe64(img, at, entry);
    auto image = OpenRO(img);
    auto p = StateOf(*image).map->Lookup(guest);
    REQUIRE_FALSE(p.ok());
    CHECK(p.status().kind() == ErrorKind::kCorruption);
    CHECK_MESSAGE(p.status().message().find(words) != std::string::npos, p.status().message());
  };
  SUBCASE("reserved bits 1-8") { expect(at0, e0 | 0x10, 0, "reserved bits"); }
  SUBCASE("reserved bits 56-61") { expect(at0, e0 | (1ull << 58), 0, "reserved bits"); }
  SUBCASE("misaligned data offset") { expect(at0, e0 + 512, 0, "not cluster aligned"); }
  SUBCASE("data beyond the end of the file") {
    expect(at0, kFlagCopied | ((size + 65535) / 65536 * 65536 + 65536), 0, "beyond the end");
  }
  SUBCASE("offset 0 with COPIED is unallocated, as in QEMU (no external data file)") {
    PutBe64(img, at0, kFlagCopied);
    auto image = OpenRO(img);
    auto p = StateOf(*image).map->Lookup(0);
    REQUIRE(p.ok());
    CHECK(p->kind == ClusterKind::kUnallocated);
  }
  // Data can never lie over the header: the only cluster-aligned offset in
  // the header cluster is 0, which means unallocated (above); any other is
  // misaligned.
  SUBCASE("an offset inside the header cluster is misaligned") {
    expect(at0, kFlagCopied | 0x200, 0, "not cluster aligned");
  }
  SUBCASE("data over the L1 table") { expect(at0, kFlagCopied | Be(file, 40), 0, "overlaps the L1 table"); }
  SUBCASE("data over the refcount table") { expect(at0, kFlagCopied | 0x10000, 0, "refcount"); }
  SUBCASE("compressed data beyond the end of the file") {
    const uint64_t far = (size + (1u << 20));
    expect(at1, EncodeCompressed(far, 100, 16), 65536, "outside the file");
  }
  SUBCASE("compressed data in the header cluster") { expect(at1, EncodeCompressed(100, 100, 16), 65536, "outside"); }
}

TEST_CASE("Lookup refuses damaged extended L2 bitmaps and zero flags in v2") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  const std::string img = dir / "e.qcow2";
  Must("qemu-img create -q -f qcow2 -o extended_l2=on " + Sh(img) + " 1M");
  QemuIo(img, {"write -P 0x11 0 4k"});
  const uint64_t at = L2EntryOffset(img, 0);
  const Bytes file = ReadAll(img);
  const uint64_t e = Be(file, at), bitmap = Be(file, at + 8);
  REQUIRE(bitmap == 0x3);
  auto lookup = [&](uint64_t guest) {
    auto image = OpenRO(img);
    return StateOf(*image).map->Lookup(guest);
  };
  SUBCASE("allocated and zero at once") {
    PutBe64(img, at + 8, bitmap | (1ull << 32));
    auto p = lookup(0);
    REQUIRE_FALSE(p.ok());
    CHECK(p.status().message().find("both allocated and zero") != std::string::npos);
    CHECK_FALSE(lookup(2048).ok());  // the whole entry is invalid, as QEMU reads it (EIO)
  }
  SUBCASE("allocated without a host cluster") {
    PutBe64(img, at, 0);
    auto p = lookup(0);
    REQUIRE_FALSE(p.ok());
    CHECK(p.status().kind() == ErrorKind::kCorruption);
  }
  SUBCASE("bit 0 of the descriptor is reserved with extended L2 entries") {
    PutBe64(img, at, e | kFlagZero);
    auto p = lookup(0);
    REQUIRE_FALSE(p.ok());
    CHECK(p.status().message().find("reserved") != std::string::npos);
  }
  SUBCASE("v2 has no zero flag") {
    const std::string v2 = dir / "v2.qcow2";
    Must("qemu-img create -q -f qcow2 -o compat=0.10 " + Sh(v2) + " 1M");
    QemuIo(v2, {"write -P 0x11 0 64k"});
    const uint64_t a = L2EntryOffset(v2, 0);
    PutBe64(v2, a, Be(ReadAll(v2), a) | kFlagZero);
    auto image = OpenRO(v2);
    auto p = StateOf(*image).map->Lookup(0);
    REQUIRE_FALSE(p.ok());
    CHECK(p.status().kind() == ErrorKind::kCorruption);
  }
}

TEST_CASE("Open refuses damaged L1 entries") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  const std::string img = dir / "l1.qcow2";
  Must("qemu-img create -q -f qcow2 " + Sh(img) + " 1M");
  QemuIo(img, {"write -P 0xaa 0 64k"});
  const Bytes file = ReadAll(img);
  const uint64_t l1 = Be(file, 40), e = Be(file, l1);
  REQUIRE(L1Offset(e) != 0);
  auto expect = [&](uint64_t entry, const std::string& words) {
    PutBe64(img, l1, entry);
    auto image = Image::Open(img, {});
    REQUIRE_FALSE(image.ok());
    CHECK(image.status().kind() == ErrorKind::kCorruption);
    CHECK_MESSAGE(image.status().message().find(words) != std::string::npos, image.status().message());
  };
  SUBCASE("reserved bits") { expect(e | 1, "reserved bits"); }
  SUBCASE("reserved bits 56-62") { expect(e | (1ull << 60), "reserved bits"); }
  SUBCASE("misaligned") { expect(e + 512, "not cluster aligned"); }
  SUBCASE("beyond the end") { expect(kFlagCopied | (1ull << 40), "beyond the end"); }
  SUBCASE("over the L1 table itself") { expect(kFlagCopied | l1, "overlaps"); }
  SUBCASE("over the refcount table") { expect(kFlagCopied | 0x10000, "refcount table"); }
}
