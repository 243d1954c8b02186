// check against images QEMU made: whatever qemu-img and qemu-io produce
// (snapshots, compressed clusters, zero clusters, persistent bitmaps,
// refcount widths 1 to 64, clusters of 512 bytes to 2 MiB, version 2,
// extended L2 entries, a crash with lazy refcounts), our CheckImage must
// give the numbers `qemu-img check --output=json` gives, and repair what
// qemu-img repairs to the same end.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "qcow2dedup/check.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Run;
using testing::Sh;
using testing::TempDir;

namespace {

struct QemuCheck {
  int exit_code;
  nlohmann::json json;
  std::string err;
  uint64_t Get(const char* key) const { return json.contains(key) ? json[key].get<uint64_t>() : 0; }
};

QemuCheck Qemu(const std::string& path, const std::string& repair = "") {
  auto r = Run("qemu-img check --output=json " + (repair.empty() ? "" : "-r " + repair + " ") + Sh(path));
  QemuCheck q{r.exit_code, nlohmann::json::object(), r.err};
  if (!r.out.empty()) q.json = nlohmann::json::parse(r.out, nullptr, false);
  if (q.json.is_discarded()) q.json = nlohmann::json::object();
  return q;
}

CheckReport Ours(const std::string& path, RepairMode mode = RepairMode::kNone) {
  CheckOptions o;
  o.repair = mode;
  auto r = CheckImage(path, std::move(o));
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  return *r;
}

std::string Messages(const CheckReport& r) {
  std::string s;
  for (const auto& m : r.messages) s += m + "\n";
  return s;
}

void SameAsQemu(const CheckReport& ours, const QemuCheck& q) {
  INFO("ours:\n" << Messages(ours) << "qemu-img:\n" << q.err << q.json.dump());
  CHECK(CheckExitCode(ours) == q.exit_code);
  CHECK(ours.check_errors == q.Get("check-errors"));
  CHECK(ours.corruptions == q.Get("corruptions"));
  CHECK(ours.leaks == q.Get("leaks"));
  CHECK(ours.image_end_offset == q.Get("image-end-offset"));
  CHECK(ours.total_clusters == q.Get("total-clusters"));
  CHECK(ours.allocated_clusters == q.Get("allocated-clusters"));
  CHECK(ours.fragmented_clusters == q.Get("fragmented-clusters"));
  CHECK(ours.compressed_clusters == q.Get("compressed-clusters"));
}

void Sh0(const std::string& cmd) {
  auto r = Run(cmd);
  REQUIRE_MESSAGE(r.exit_code == 0, cmd << "\n" << r.err << r.out);
}

std::string Io(const std::string& img, const std::vector<std::string>& cmds, const std::string& opts = "") {
  std::string line = "qemu-io " + opts + " ";
  for (const auto& c : cmds) line += "-c " + Sh(c) + " ";
  return line + Sh(img);
}

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

bool HaveQemu() { return testing::HaveCommand("qemu-img") && testing::HaveCommand("qemu-io"); }

// A clean image: we agree with qemu-img, and repair leaves it byte for byte.
void Agree(const std::string& img) {
  const CheckReport r = Ours(img);
  const QemuCheck q = Qemu(img);
  SameAsQemu(r, q);
  CHECK(q.exit_code == 0);
  CHECK_FALSE(r.dedup.present);
  const std::string before = Slurp(img);
  const CheckReport fixed = Ours(img, RepairMode::kAll);
  CHECK(CheckExitCode(fixed) == 0);
  CHECK(Slurp(img) == before);
}

// A typical life: data, overwrites, a discard, zero writes, a compressed write.
std::vector<std::string> Life(const std::string& size_hint) {
  (void)size_hint;
  return {"write -P 0x11 0 1M",         "write -P 0x22 3M 640k",  "write -P 0x33 512k 64k",
          "write -z 2M 256k",            "write -z -u 3M 128k",    "discard 5M 64k",
          "write -P 0x44 7M 4k",         "write -c -P 0x55 8M 2M", "write -P 0x66 12M 300k"};
}

}  // namespace

TEST_CASE("qemu-made images: cluster sizes and refcount widths") {
  if (!HaveQemu()) return;
  struct Variant {
    std::string options;
  };
  const std::vector<std::string> variants = {
      "cluster_size=65536",
      "cluster_size=512",
      "cluster_size=2M",
      "cluster_size=4096,refcount_bits=1",
      "cluster_size=65536,refcount_bits=2",
      "cluster_size=65536,refcount_bits=8",
      "cluster_size=65536,refcount_bits=32",
      "cluster_size=65536,refcount_bits=64",
      "cluster_size=65536,compat=0.10",
      "cluster_size=65536,extended_l2=on",
      "cluster_size=32768,extended_l2=on,refcount_bits=64",
  };
  for (const auto& v : variants) {
    CAPTURE(v);
    TempDir dir;
    const std::string img = dir / "q.qcow2";
    Sh0("qemu-img create -q -f qcow2 -o " + v + " " + Sh(img) + " 16M");
    Sh0(Io(img, Life(v)));
    Agree(img);
  }
}

TEST_CASE("qemu-made images: internal snapshots share clusters and L2 tables") {
  if (!HaveQemu()) return;
  for (std::string opts : {"cluster_size=65536", "cluster_size=4096,refcount_bits=64", "cluster_size=512"}) {
    CAPTURE(opts);
    TempDir dir;
    const std::string img = dir / "snap.qcow2";
    Sh0("qemu-img create -q -f qcow2 -o " + opts + " " + Sh(img) + " 8M");
    Sh0(Io(img, {"write -P 1 0 2M", "write -P 2 4M 1M"}));
    Sh0("qemu-img snapshot -c one " + Sh(img));
    Sh0(Io(img, {"write -P 3 512k 128k", "write -P 4 6M 64k"}));
    Sh0("qemu-img snapshot -c two " + Sh(img));
    Sh0("qemu-img snapshot -c three " + Sh(img));
    Sh0(Io(img, {"write -P 5 0 64k", "discard 4M 512k"}));
    Sh0("qemu-img snapshot -d two " + Sh(img));
    Agree(img);
  }
}

TEST_CASE("qemu-made images: compressed by convert -c, and a persistent bitmap") {
  if (!HaveQemu()) return;
  TempDir dir;
  const std::string src = dir / "src.qcow2", img = dir / "c.qcow2";
  Sh0("qemu-img create -q -f qcow2 " + Sh(src) + " 8M");
  Sh0(Io(src, {"write -P 7 0 3M", "write -P 9 5M 1M"}));
  for (std::string opts : {"cluster_size=65536", "cluster_size=4096", "cluster_size=2M"}) {
    CAPTURE(opts);
    std::filesystem::remove(img);
    Sh0("qemu-img convert -c -O qcow2 -o " + opts + " " + Sh(src) + " " + Sh(img));
    const CheckReport r = Ours(img);
    CHECK(r.compressed_clusters > 0);
    Agree(img);
  }
  Sh0("qemu-img bitmap --add " + Sh(img) + " b0");
  Sh0("qemu-img bitmap --add -g 512k " + Sh(img) + " b1");
  Agree(img);
}

TEST_CASE("a crash with lazy refcounts: same findings and same repair as qemu-img") {
  if (!HaveQemu()) return;
  TempDir dir;
  const std::string img = dir / "lazy.qcow2", copy = dir / "copy.qcow2";
  Sh0("qemu-img create -q -f qcow2 -o lazy_refcounts=on " + Sh(img) + " 16M");
  Sh0(Io(img, {"write -P 1 0 4M"}));
  // Killed with the refcounts of the second write never written.
  Run(Io(img, {"write -P 2 6M 2M", "write -P 3 0 64k", "sigraise 9"}));
  const CheckReport r = Ours(img);
  const QemuCheck q = Qemu(img);
  SameAsQemu(r, q);
  CHECK(q.exit_code == 2);
  std::filesystem::copy_file(img, copy);
  const QemuCheck qr = Qemu(copy, "all");
  const CheckReport fixed = Ours(img, RepairMode::kAll);
  INFO("ours:\n" << Messages(fixed) << "qemu-img:\n" << qr.err);
  CHECK(CheckExitCode(fixed) == qr.exit_code);
  CHECK(fixed.corruptions_fixed == qr.Get("corruptions-fixed"));
  CHECK(fixed.leaks_fixed == qr.Get("leaks-fixed"));
  SameAsQemu(Ours(img), Qemu(img));
  CHECK(Qemu(img).exit_code == 0);
  CHECK(Run("qemu-img compare " + Sh(img) + " " + Sh(copy)).exit_code == 0);
  // qemu-img's repair of the copy: we agree it is clean.
  SameAsQemu(Ours(copy), Qemu(copy));
}

TEST_CASE("damage to a snapshot image: same counts as qemu-img, before and after repair") {
  if (!HaveQemu()) return;
  TempDir dir;
  const std::string img = dir / "snapdmg.qcow2", copy = dir / "copy.qcow2";
  Sh0("qemu-img create -q -f qcow2 " + Sh(img) + " 8M");
  Sh0(Io(img, {"write -P 1 0 1M"}));
  Sh0("qemu-img snapshot -c one " + Sh(img));
  Sh0("qemu-img snapshot -c two " + Sh(img));
  // The first data cluster (refcount 3: active and two snapshots) drops to
  // 1, and the active L2 table's refcount (3) rises to 4: one corruption in
  // the refcounts, COPIED now wrong in the active table, and a leak.
  const std::string map = Run("qemu-img map --output=json " + Sh(img)).out;
  auto j = nlohmann::json::parse(map);
  const uint64_t data = j[0]["offset"].get<uint64_t>();
  auto info = nlohmann::json::parse(Run("qemu-img info --output=json " + Sh(img)).out);
  (void)info;
  // Refcount block 0 is at the offset in the first refcount table entry; 16-bit entries.
  auto rd = [&](uint64_t at) {
    std::ifstream f(img, std::ios::binary);
    f.seekg(at);
    uint8_t b[8];
    f.read(reinterpret_cast<char*>(b), 8);
    uint64_t v = 0;
    for (uint8_t x : b) v = v << 8 | x;
    return v;
  };
  auto wr16 = [&](uint64_t at, uint16_t v) {
    std::fstream f(img, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(at);
    const char b[2] = {char(v >> 8), char(v)};
    f.write(b, 2);
  };
  const uint64_t reftable = rd(48), l1 = rd(40);
  const uint64_t block = rd(reftable), l2 = rd(l1) & 0x00fffffffffffe00ull;
  wr16(block + data / 65536 * 2, 1);
  wr16(block + l2 / 65536 * 2, 4);
  const CheckReport r = Ours(img);
  const QemuCheck q = Qemu(img);
  SameAsQemu(r, q);
  CHECK(q.exit_code == 2);
  std::filesystem::copy_file(img, copy);
  const QemuCheck qr = Qemu(copy, "all");
  const CheckReport fixed = Ours(img, RepairMode::kAll);
  INFO("ours:\n" << Messages(fixed) << "qemu-img:\n" << qr.err);
  CHECK(CheckExitCode(fixed) == qr.exit_code);
  CHECK(fixed.corruptions_fixed == qr.Get("corruptions-fixed"));
  CHECK(fixed.leaks_fixed == qr.Get("leaks-fixed"));
  CHECK(Qemu(img).exit_code == 0);
  CHECK(Run("qemu-img compare " + Sh(img) + " " + Sh(copy)).exit_code == 0);
  CHECK(Run("qemu-img snapshot -l " + Sh(img)).exit_code == 0);
}
