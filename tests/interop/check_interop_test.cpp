// check against images QEMU made: whatever qemu-img and qemu-io produce
// (snapshots, compressed clusters, zero clusters, persistent bitmaps,
// refcount widths 1 to 64, clusters of 512 bytes to 2 MiB, version 2,
// extended L2 entries, a crash with lazy refcounts), our CheckImage must
// give the numbers `qemu-img check --output=json` gives, and repair what
// qemu-img repairs to the same end.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>

#include "format/entries.h"
#include "qcow2dedup/check.h"
#include "support/check_helpers.h"
#include "support/process.h"
#include "support/require_command.h"
#include "support/qcow2_layout.h"
#include "support/qemu_images.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using namespace testing;
using testing::images::MustRun;

namespace {

void Sh0(const std::string& cmd) { MustRun(cmd); }

std::string Io(const std::string& img, const std::vector<std::string>& cmds, const std::string& opts = "") {
  std::string line = "qemu-io " + opts + " ";
  for (const auto& c : cmds) line += "-c " + Sh(c) + " ";
  return line + Sh(img);
}

void RequireQemu() {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
}

// A clean image: we agree with qemu-img, and repair leaves it byte for byte.
void Agree(const std::string& img) {
  const CheckReport r = OurCheck(img);
  const QemuCheckResult q = QemuImgCheck(img);
  SameAsQemu(r, q);
  CHECK(q.exit_code == 0);
  CHECK_FALSE(r.dedup.present);
  const std::string before = ReadFileBytes(img);
  const CheckReport fixed = OurCheck(img, RepairMode::kAll);
  CHECK(CheckExitCode(fixed) == 0);
  CHECK(ReadFileBytes(img) == before);
}

// Damage qemu-img sees: the same verdict from both tools; then qemu-img
// repairs a copy and we repair the original, to the same counts, the same
// clean result for both tools and the same guest data.
void RepairLikeQemu(const TempDir& dir, const std::string& img, int want_exit) {
  const CheckReport r = OurCheck(img);
  const QemuCheckResult q = QemuImgCheck(img);
  SameAsQemu(r, q);
  CHECK(q.exit_code == want_exit);
  const std::string copy = dir / "qemu-repaired.qcow2";
  CopyFile(img, copy);
  const QemuCheckResult qr = QemuImgCheck(copy, "all");
  const CheckReport fixed = OurCheck(img, RepairMode::kAll);
  INFO("ours:\n" << Messages(fixed) << "qemu-img:\n" << qr.err);
  CHECK(CheckExitCode(fixed) == qr.exit_code);
  CHECK(fixed.corruptions_fixed == qr.Get("corruptions-fixed"));
  CHECK(fixed.leaks_fixed == qr.Get("leaks-fixed"));
  SameAsQemu(OurCheck(img), QemuImgCheck(img));
  CHECK(QemuImgCheck(img).exit_code == 0);
  CHECK(Run("qemu-img compare " + Sh(img) + " " + Sh(copy)).exit_code == 0);
  // qemu-img's repair of the copy: we agree it is clean.
  SameAsQemu(OurCheck(copy), QemuImgCheck(copy));
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
  RequireQemu();
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
  RequireQemu();
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
  RequireQemu();
  TempDir dir;
  const std::string src = dir / "src.qcow2", img = dir / "c.qcow2";
  Sh0("qemu-img create -q -f qcow2 " + Sh(src) + " 8M");
  Sh0(Io(src, {"write -P 7 0 3M", "write -P 9 5M 1M"}));
  for (std::string opts : {"cluster_size=65536", "cluster_size=4096", "cluster_size=2M"}) {
    CAPTURE(opts);
    std::filesystem::remove(img);
    Sh0("qemu-img convert -c -O qcow2 -o " + opts + " " + Sh(src) + " " + Sh(img));
    const CheckReport r = OurCheck(img);
    CHECK(r.compressed_clusters > 0);
    Agree(img);
  }
  Sh0("qemu-img bitmap --add " + Sh(img) + " b0");
  Sh0("qemu-img bitmap --add -g 512k " + Sh(img) + " b1");
  Agree(img);
}

TEST_CASE("a crash with lazy refcounts: same findings and same repair as qemu-img") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "lazy.qcow2";
  Sh0("qemu-img create -q -f qcow2 -o lazy_refcounts=on " + Sh(img) + " 16M");
  Sh0(Io(img, {"write -P 1 0 4M"}));
  // Killed with the refcounts of the second write never written.
  Run(Io(img, {"write -P 2 6M 2M", "write -P 3 0 64k", "sigraise 9"}));
  RepairLikeQemu(dir, img, 2);
}

TEST_CASE("damage to a snapshot image: same counts as qemu-img, before and after repair") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "snapdmg.qcow2";
  Sh0("qemu-img create -q -f qcow2 " + Sh(img) + " 8M");
  Sh0(Io(img, {"write -P 1 0 1M"}));
  Sh0("qemu-img snapshot -c one " + Sh(img));
  Sh0("qemu-img snapshot -c two " + Sh(img));
  // The first data cluster (refcount 3: active and two snapshots) drops to
  // 1, and the active L2 table's refcount (3) rises to 4: one corruption in
  // the refcounts, COPIED now wrong in the active table, and a leak.
  {
    ImageBytes raw(img);
    REQUIRE(raw.Refcount(raw.HostCluster(0)) == 3);
    raw.SetRefcount(raw.HostCluster(0), 1);
    raw.SetRefcount(raw.L2TableCluster(0), 4);
  }
  RepairLikeQemu(dir, img, 2);
  CHECK(Run("qemu-img snapshot -l " + Sh(img)).exit_code == 0);
}

namespace {

// The CLI on the same files as qemu-img: images written by `qcow2dedup
// convert`, damaged on purpose, judged by `qcow2dedup check` (human and
// JSON output, exit code) and by `qemu-img check`, repaired by `qcow2dedup
// check -r`, and judged again; the guest data compared by `qemu-img compare`.

constexpr uint64_t kCs = 65536;

RunResult OurCli(const std::string& args) { return Run(Tool() + " " + args); }

// 16 guest clusters: 0..3 distinct, 4 and 5 copies of 0 (one host cluster,
// refcount 3), 6 a copy of 1 (refcount 2), the rest zero.
std::string GuestCluster(uint32_t g) { return images::RandomBytes(kCs, 100 + g); }

std::string MakeDedupImage(const TempDir& dir) {
  std::string disk;
  for (uint32_t g : {0u, 1u, 2u, 3u, 0u, 0u, 1u}) disk += GuestCluster(g);
  disk.resize(16 * kCs, '\0');
  const std::string raw = dir / "guest.raw", img = dir / "dedup.qcow2";
  images::WriteBytes(raw, disk);
  MustRun(Tool() + " convert -q " + Sh(raw) + " " + Sh(img));
  CheckQemuIdentical(img, raw);
  return img;
}

struct Damage {
  const char* name;
  std::function<void(ImageBytes&)> apply;
  int ours, qemu;             // exit codes of qcow2dedup check and qemu-img check
  uint64_t dedup_errors;      // what our check finds wrong with the dedup index
  const char* repair;         // the -r mode that mends it
  bool guest_data_unchanged;  // whether the damage leaves what the guest reads alone
};

const std::vector<Damage>& Damages() {
  static const std::vector<Damage> list = {
      {"a refcount raised (a leak)",
       [](ImageBytes& b) { b.SetRefcount(b.HostCluster(0), 4); }, 3, 3, 0, "leaks", true},
      {"a refcount lowered (a corruption; COPIED then looks wrong on both sharers)",
       [](ImageBytes& b) { b.SetRefcount(b.HostCluster(1), 1); }, 2, 2, 0, "all", true},
      {"COPIED flipped on an unshared and on a shared cluster",
       [](ImageBytes& b) {
         b.SetL2(2, b.L2(2) & ~kFlagCopied);
         b.SetL2(4, b.L2(4) | kFlagCopied);
       },
       2, 2, 0, "all", true},
      // Guest 3's own cluster, no longer referenced, is a leak, and its index
      // entry names a cluster that holds no guest data.
      {"an L2 entry pointing at the L1 table",
       [](ImageBytes& b) { b.SetL2(3, b.header().l1_offset | kFlagCopied); }, 2, 2, 1, "all", false},
      {"an L2 entry pointing at a refcount block",
       [](ImageBytes& b) { b.SetL2(3, b.Get64(b.header().reftable_offset) | kFlagCopied); }, 2, 2, 1, "all", false},
      {"a data cluster changed behind the index's back",
       [](ImageBytes& b) {
         const std::string other = images::RandomBytes(kCs, 999);
         b.Write(b.HostCluster(2) * kCs, std::span(reinterpret_cast<const uint8_t*>(other.data()), other.size()));
       },
       2, 0, 2, "all", false},  // the entry for the old data is wrong; the new data has none
      {"an index entry left for a freed cluster",
       [](ImageBytes& b) {
         const uint64_t c = b.HostCluster(3);
         b.SetL2(3, 0);
         b.SetRefcount(c, 0);
       },
       2, 0, 1, "all", false},
  };
  return list;
}

// Our JSON has exactly qemu-img's keys with qemu-img's values, and a
// "dedup" object besides.
void SameJsonAsQemu(const std::string& ours_out, const QemuCheckResult& q) {
  INFO("ours: " << ours_out << "\nqemu-img: " << q.out);
  const nlohmann::json ours = nlohmann::json::parse(ours_out, nullptr, false);
  REQUIRE(ours.is_object());
  REQUIRE(q.json.is_object());
  CHECK(ours.contains("dedup"));
  CHECK(ours["dedup"].is_object());
  nlohmann::json rest = ours;
  rest.erase("dedup");
  CHECK(rest == q.json);
  std::vector<std::string> ours_keys, qemu_keys;
  for (auto it = rest.begin(); it != rest.end(); ++it) ours_keys.push_back(it.key());
  for (auto it = q.json.begin(); it != q.json.end(); ++it) qemu_keys.push_back(it.key());
  CHECK(ours_keys == qemu_keys);
}

}  // namespace

TEST_CASE("damaged dedup images: the CLI's verdict beside qemu-img's, repair, then both clean and the guest data unchanged") {
  RequireQemu();
  for (const Damage& d : Damages()) {
    const std::string name = d.name;
    CAPTURE(name);
    TempDir dir;
    const std::string img = MakeDedupImage(dir);
    {
      ImageBytes bytes(img);
      d.apply(bytes);
    }
    // What the guest reads now, whatever the damage did to it; the repair
    // must keep exactly this.
    const std::string view = dir / "damaged.raw";
    GuestView(img, view);
    if (d.guest_data_unchanged) CheckQemuIdentical(img, dir / "guest.raw");

    // Without -r the file is not written.
    const std::string digest = images::FileDigest(img);
    const RunResult human = OurCli("check " + Sh(img));
    const RunResult json = OurCli("check --output=json " + Sh(img));
    const QemuCheckResult q = QemuImgCheck(img);
    INFO("ours:\n" << human.out << human.err << "qemu-img:\n" << q.out << q.err);
    CHECK(images::FileDigest(img) == digest);
    CHECK(human.exit_code == d.ours);
    CHECK(json.exit_code == d.ours);
    CHECK(q.exit_code == d.qemu);
    SameJsonAsQemu(json.out, q);
    const auto dedup = nlohmann::json::parse(json.out, nullptr, false)["dedup"];
    const uint64_t dedup_errors =
        dedup["mismatched"].get<uint64_t>() + dedup["stale"].get<uint64_t>() + dedup["missing"].get<uint64_t>();
    CHECK(dedup_errors == d.dedup_errors);
    if (dedup_errors)
      CHECK(human.out.find(std::to_string(dedup_errors) + " corruptions were found in the dedup metadata.") !=
            std::string::npos);
    // The human output says what is wrong, and never that nothing is.
    CHECK(human.out.find("No errors were found on the image.") == std::string::npos);
    if (q.exit_code == 0) {
      CHECK(human.out.find("No errors were found in the qcow2 structure.") != std::string::npos);
      CHECK(human.err.find("ERROR dedup index") != std::string::npos);
      // -r leaks leaves the index alone (and the file with it).
      CHECK(OurCli("check -r leaks " + Sh(img)).exit_code == 2);
      CHECK(images::FileDigest(img) == digest);
    } else {
      CHECK(human.out.find(q.exit_code == 3 ? "leaked clusters were found on the image."
                                            : "errors were found on the image.") != std::string::npos);
    }

    const RunResult repair = OurCli("check -r " + std::string(d.repair) + " " + Sh(img));
    INFO("ours -r " << d.repair << ":\n" << repair.out << repair.err);
    CHECK(repair.exit_code == 0);
    CHECK(repair.out.find("No errors were found on the image.") != std::string::npos);

    const RunResult again = OurCli("check " + Sh(img));
    INFO("ours after the repair:\n" << again.out << again.err);
    CHECK(again.exit_code == 0);
    CHECK(again.out.find("No errors were found on the image.") != std::string::npos);
    CHECK(again.err.find("ERROR") == std::string::npos);
    CheckQemuClean(img);
    CheckQemuIdentical(img, view);
    if (d.guest_data_unchanged) CheckQemuIdentical(img, dir / "guest.raw");
  }
}

TEST_CASE("after a cluster changed behind the index is repaired, writing its original content stores it anew") {
  RequireQemu();
  TempDir dir;
  const std::string img = MakeDedupImage(dir);
  uint64_t changed_at = 0;
  const std::string changed = images::RandomBytes(kCs, 999);
  {
    ImageBytes bytes(img);
    changed_at = bytes.HostCluster(1) * kCs;  // shared by guest clusters 1 and 6
    bytes.Write(changed_at, std::span(reinterpret_cast<const uint8_t*>(changed.data()), changed.size()));
  }
  CHECK(OurCli("check " + Sh(img)).exit_code == 2);
  CHECK(QemuImgCheck(img).exit_code == 0);
  REQUIRE(OurCli("check -r all " + Sh(img)).exit_code == 0);

  // Guest cluster 8 gets what guest 1 held before the damage.
  const std::string original = dir / "original.bin";
  images::WriteBytes(original, GuestCluster(1));
  MustRun(Tool() + " write -q --input " + Sh(original) + " " + Sh(img) + " " + std::to_string(8 * kCs));
  std::string error;
  const auto layout = ReadQcow2Layout(img, &error);
  REQUIRE_MESSAGE(layout, error);
  CHECK(layout->HostOffset(8) != 0);
  CHECK(layout->HostOffset(8) != layout->HostOffset(1));
  CHECK(layout->HostOffset(1) == changed_at);
  CHECK(layout->HostOffset(6) == changed_at);

  std::string want;
  for (uint32_t g : {0u, 1u, 2u, 3u, 0u, 0u, 1u}) want += g == 1 ? changed : GuestCluster(g);
  want += std::string(kCs, '\0') + GuestCluster(1);
  want.resize(16 * kCs, '\0');
  images::WriteBytes(dir / "want.raw", want);
  CheckQemuIdentical(img, dir / "want.raw");
  CHECK(OurCli("check " + Sh(img)).exit_code == 0);
  CheckQemuClean(img);
}
