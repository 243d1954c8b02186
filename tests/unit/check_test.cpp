// check through the library: images we write, damaged on purpose byte by
// byte, judged by CheckImage and by `qemu-img check` on the same file, then
// repaired and judged again. qemu-img is the referee for everything but the
// dedup index, which it cannot see.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "dedup/index_table.h"
#include "dedup/sha256.h"
#include "format/endian.h"
#include "format/entries.h"
#include "format/header.h"
#include "qcow2dedup/check.h"
#include "qcow2dedup/image.h"
#include "support/check_helpers.h"
#include "support/forwarding_file.h"
#include "support/process.h"
#include "support/require_command.h"
#include "support/stored_index.h"
#include "support/qcow2_layout.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using namespace testing;

namespace {

constexpr uint64_t kCs = 65536;

std::vector<uint8_t> Pattern(uint32_t seed, size_t n = kCs) {
  std::vector<uint8_t> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = uint8_t(rng());
  return v;
}

// An image of 16 clusters: guest clusters 0..3 distinct, 4 and 5 the same
// as 0 (one host cluster, refcount 3), 6 a copy of 1 (refcount 2), the rest
// unallocated.
void MakeImage(const std::string& path, uint32_t refcount_bits = 16, uint32_t cs = kCs) {
  CreateOptions o;
  o.virtual_size = 16 * uint64_t(cs);
  o.refcount_bits = refcount_bits;
  o.cluster_size = cs;
  auto img = Image::Create(path, o);
  REQUIRE(img.ok());
  for (uint32_t g = 0; g < 4; ++g) REQUIRE((*img)->Write(g * uint64_t(cs), Pattern(g, cs)).ok());
  REQUIRE((*img)->Write(4 * uint64_t(cs), Pattern(0, cs)).ok());
  REQUIRE((*img)->Write(5 * uint64_t(cs), Pattern(0, cs)).ok());
  REQUIRE((*img)->Write(6 * uint64_t(cs), Pattern(1, cs)).ok());
  REQUIRE((*img)->Close().ok());
}

// Damage, judge with both tools, repair a copy with qemu-img and the
// original with us, and judge both repairs with both tools.
struct Expect {
  int ours;  // our exit code for the damaged file
  int qemu;  // qemu-img check's (0 where only the dedup index is wrong: it cannot see it)
  RepairMode mode = RepairMode::kAll;
  // Whether qemu-img's own repair fixes as much and ends clean for us too
  // (not so where it leaves guest data on metadata).
  bool same_as_qemu_repair = true;
};

struct Outcome {
  CheckReport before, repaired;
  QemuCheckResult qemu_before, qemu_repair;
  std::string view;  // the guest view of the damaged image, before any repair
};

Outcome JudgeAndRepair(const TempDir& dir, const std::string& img, const Expect& want) {
  Outcome o;
  o.before = OurCheck(img);
  o.qemu_before = QemuImgCheck(img);
  SameCountsAsQemu(o.before, o.qemu_before);
  CHECK(CheckExitCode(o.before) == want.ours);
  CHECK(o.qemu_before.exit_code == want.qemu);

  o.view = GuestView(img, dir / "before.raw");
  const std::string qcopy = dir / "qemu-repaired.qcow2";
  CopyFile(img, qcopy);
  o.qemu_repair = QemuImgCheck(qcopy, want.mode == RepairMode::kAll ? "all" : "leaks");
  o.repaired = OurCheck(img, want.mode);
  INFO("ours:\n" << Messages(o.repaired) << "qemu-img -r:\n" << o.qemu_repair.err << o.qemu_repair.out);
  CHECK(CheckExitCode(o.repaired) == 0);
  if (want.same_as_qemu_repair) {
    CHECK(o.qemu_repair.exit_code == 0);
    CHECK(o.repaired.leaks_fixed == o.qemu_repair.Get("leaks-fixed"));
    CHECK(o.repaired.corruptions_fixed == o.qemu_repair.Get("corruptions-fixed"));
  }
  // Repaired by us: clean for both tools, same guest data.
  const CheckReport again = OurCheck(img);
  const QemuCheckResult q = QemuImgCheck(img);
  SameAsQemu(again, q);
  CHECK(q.exit_code == 0);
  CHECK(CheckExitCode(again) == 0);
  CHECK(again.findings.empty());
  CHECK(GuestView(img, dir / "after.raw") == o.view);
  // And our check agrees with qemu-img about qemu-img's own repair (which,
  // opening the image for writing, takes our index out of sync).
  if (want.same_as_qemu_repair) {
    const CheckReport theirs = OurCheck(qcopy);
    SameAsQemu(theirs, QemuImgCheck(qcopy));
    CHECK(CheckExitCode(theirs) == 0);
    CHECK(GuestView(qcopy, dir / "qemu-after.raw") == o.view);
  }
  return o;
}

std::vector<uint8_t> ReadGuest(const std::string& path, uint64_t offset, size_t n) {
  auto img = Image::Open(path, {});
  REQUIRE_MESSAGE(img.ok(), img.status().message());
  std::vector<uint8_t> buf(n);
  REQUIRE((*img)->Read(offset, buf).ok());
  return buf;
}

void RequireQemu() { testing::RequireCommand("qemu-img"); }

}  // namespace

TEST_CASE("a fresh dedup image is clean, as qemu-img says too") {
  RequireQemu();
  TempDir dir;
  const std::vector<std::pair<uint32_t, uint32_t>> variants = {
      {1, 65536}, {16, 65536}, {64, 65536}, {16, 512}, {2, 512}, {16, 2u << 20}};
  for (const auto& variant : variants) {
    const auto [bits, cs] = variant;  // a copy: clang 14 (the sanitizer build) cannot capture a binding in CAPTURE
    CAPTURE(variant.first);
    CAPTURE(variant.second);
    const std::string img = dir / ("clean" + std::to_string(bits) + "-" + std::to_string(cs) + ".qcow2");
    MakeImage(img, bits, cs);
    const CheckReport r = OurCheck(img);
    SameAsQemu(r, QemuImgCheck(img));
    CHECK(CheckExitCode(r) == 0);
    CHECK(r.findings.empty());
    CHECK(r.dedup.present);
    CHECK(r.dedup.in_sync);
    CHECK(r.dedup.index_loaded);
    CHECK(r.dedup.errors() == 0);
    // Four distinct contents; how often they are stored twice depends on how
    // far the writer lets a narrow refcount grow (with one bit: never shared).
    CHECK(r.dedup.stored_clusters - r.dedup.duplicates == 4);
    if (bits == 1) CHECK(r.dedup.duplicates == 3);
    if (bits >= 16) CHECK(r.dedup.duplicates == 0);
    CHECK(r.allocated_clusters == 7);
    // Repairing a clean image changes nothing.
    auto before = ImageBytes(img).Read(0, std::filesystem::file_size(img));
    const CheckReport rep = OurCheck(img, RepairMode::kAll);
    CHECK(CheckExitCode(rep) == 0);
    CHECK(ImageBytes(img).Read(0, std::filesystem::file_size(img)) == before);
  }
}

// Found by check: when the indexed copy of some data was freed while another
// copy stayed stored (past the share limit, or with 1-bit refcounts), the
// writer dropped the digest from the index. The index now holds every copy.
TEST_CASE("writer: freeing the indexed copy of duplicated data keeps the index whole") {
  TempDir dir;
  const std::string img = dir / "writer-missing.qcow2";
  CreateOptions o;
  o.virtual_size = 16 * kCs;
  o.refcount_bits = 1;
  {
    auto w = Image::Create(img, o);
    REQUIRE(w.ok());
    REQUIRE((*w)->Write(0, Pattern(1)).ok());
    REQUIRE((*w)->Write(kCs, Pattern(1)).ok());  // a second copy: nothing can be shared
    REQUIRE((*w)->Close().ok());
  }
  {
    auto w = Image::Open(img, OpenOptions{.writable = true});
    REQUIRE(w.ok());
    REQUIRE((*w)->Write(kCs, Pattern(2)).ok());  // frees the copy the index named
    REQUIRE((*w)->Close().ok());
  }
  const CheckReport r = OurCheck(img);
  CHECK(r.dedup.missing == 0);
  CHECK(CheckExitCode(r) == 0);
}

TEST_CASE("a raised refcount is a leak; -r leaks frees it") {
  RequireQemu();
  for (RepairMode mode : {RepairMode::kLeaks, RepairMode::kAll}) {
    CAPTURE(int(mode));
    TempDir dir;
    const std::string img = dir / "leak.qcow2";
    MakeImage(img);
    {
      ImageBytes raw(img);
      const uint64_t shared = raw.HostCluster(0);  // refcount 3, COPIED clear: 4 does not change COPIED
      REQUIRE(raw.Refcount(shared) == 3);
      raw.SetRefcount(shared, 4);
      raw.SetRefcount(raw.header().l1_offset / kCs, 2);  // metadata has no COPIED flag to disagree
    }
    const Outcome o = JudgeAndRepair(dir, img, {3, 3, mode});
    CHECK(o.before.leaks == 2);
    CHECK(o.before.corruptions == 0);
    CHECK(HasMessage(o.before, "Leaked cluster"));
    CHECK(o.repaired.leaks_fixed == 2);
    // The index was right before: -r leaks leaves it in sync, -r all rebuilds it.
    CHECK(o.repaired.dedup.in_sync);
    CHECK(o.repaired.dedup.errors() == 0);
    CHECK(o.repaired.dedup.rebuilt == (mode == RepairMode::kAll));
    CHECK(ImageBytes(img).Refcount(ImageBytes(img).HostCluster(0)) == 3);
    for (uint32_t g = 0; g < 4; ++g) CHECK(ReadGuest(img, g * kCs, kCs) == Pattern(g));
  }
}

TEST_CASE("a lowered refcount is a corruption; -r leaks cannot fix it, -r all can") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "low.qcow2";
  MakeImage(img);
  {
    ImageBytes raw(img);
    raw.SetRefcount(raw.HostCluster(1), 1);  // shared by guest 1 and 6, COPIED clear on both
  }
  const CheckReport leaks_only = OurCheck(img, RepairMode::kLeaks);
  CHECK(CheckExitCode(leaks_only) == 2);
  CHECK(QemuImgCheck(img).exit_code == 2);
  const Outcome o = JudgeAndRepair(dir, img, {2, 2});
  CHECK(o.before.corruptions == 3);  // the refcount, and COPIED on two entries that now look unshared
  CHECK(ReadGuest(img, 6 * kCs, kCs) == Pattern(1));
}

TEST_CASE("a referenced cluster with refcount 0 makes -r all rebuild the refcount structure") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "zero.qcow2";
  MakeImage(img);
  {
    ImageBytes raw(img);
    raw.SetRefcount(raw.HostCluster(2), 0);
    raw.SetRefcount(raw.HostCluster(0), 0);
  }
  {
    // -r leaks cannot rebuild: qemu-img gives up (exit 1), and so do we.
    const std::string a = dir / "leaks-ours.qcow2", b = dir / "leaks-qemu.qcow2";
    CopyFile(img, a);
    CopyFile(img, b);
    const CheckReport r = OurCheck(a, RepairMode::kLeaks);
    CHECK(Messages(r).find("ERROR need to rebuild refcount structures") != std::string::npos);
    CHECK(CheckExitCode(r) == 1);
    CHECK(QemuImgCheck(b, "leaks").exit_code == 1);
  }
  const Outcome o = JudgeAndRepair(dir, img, {2, 2});
  CHECK(Messages(o.repaired).find("Rebuilding refcount structure") != std::string::npos);
  for (uint32_t g = 0; g < 4; ++g) CHECK(ReadGuest(img, g * kCs, kCs) == Pattern(g));
  // The writer accepts the repaired image and dedups against it.
  {
    auto w = Image::Open(img, OpenOptions{.writable = true});
    REQUIRE_MESSAGE(w.ok(), w.status().message());
    REQUIRE((*w)->Write(9 * kCs, Pattern(2)).ok());
    CHECK((*w)->write_stats().dedup_hits == 1);
    REQUIRE((*w)->Close().ok());
  }
  CHECK(QemuImgCheck(img).exit_code == 0);
  CHECK(CheckExitCode(OurCheck(img)) == 0);
}

TEST_CASE("COPIED flipped on an L2 entry is a corruption") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "copied.qcow2";
  MakeImage(img);
  {
    ImageBytes raw(img);
    REQUIRE((raw.L2(2) & kFlagCopied) != 0);
    raw.SetL2(2, raw.L2(2) & ~kFlagCopied);   // unshared cluster without COPIED
    REQUIRE((raw.L2(4) & kFlagCopied) == 0);
    raw.SetL2(4, raw.L2(4) | kFlagCopied);    // shared cluster with COPIED: a write would change guest 0 and 5
  }
  const Outcome o = JudgeAndRepair(dir, img, {2, 2});
  CHECK(o.before.corruptions == 2);
  CHECK(Messages(o.before).find("ERROR OFLAG_COPIED data cluster: l2_entry=") != std::string::npos);
  ImageBytes raw(img);
  CHECK((raw.L2(2) & kFlagCopied) != 0);
  CHECK((raw.L2(4) & kFlagCopied) == 0);
}

TEST_CASE("COPIED flipped on an L1 entry is a corruption") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "l1copied.qcow2";
  MakeImage(img);
  {
    ImageBytes raw(img);
    const uint64_t e = raw.Get64(raw.header().l1_offset);
    raw.Set64(raw.header().l1_offset, e & ~kFlagCopied);
  }
  const Outcome o = JudgeAndRepair(dir, img, {2, 2});
  CHECK(Messages(o.before).find("OFLAG_COPIED L2 cluster: l1_index=0") != std::string::npos);
}

TEST_CASE("an L2 entry pointing at metadata is a corruption; repair moves the guest data off it") {
  RequireQemu();
  for (const char* target : {"l1", "reftable", "refblock", "l2"}) {
    CAPTURE(target);
    TempDir dir;
    const std::string img = dir / "overlap.qcow2";
    MakeImage(img);
    {
      ImageBytes raw(img);
      const Header& h = raw.header();
      uint64_t at = 0;
      if (std::string(target) == "l1") at = h.l1_offset;
      if (std::string(target) == "reftable") at = h.reftable_offset;
      if (std::string(target) == "refblock") at = raw.Get64(h.reftable_offset);
      if (std::string(target) == "l2") at = raw.L2TableCluster(0) * kCs;
      // Guest 3's own cluster loses its reference (a leak) and guest 3 now
      // reads the table's bytes.
      raw.SetL2(3, at | kFlagCopied);
    }
    const Outcome o = JudgeAndRepair(dir, img, {2, 2, RepairMode::kAll, false});
    CHECK((Messages(o.before).find("shares its cluster") != std::string::npos ||
           Messages(o.before).find("ERROR refcount block 0 refcount=2") != std::string::npos));
    CHECK(o.repaired.corruptions_fixed >= 1);
    // Our reader accepts the result: guest 3 is now data of its own.
    ImageBytes raw(img);
    CHECK(raw.HostCluster(3) * kCs != raw.header().l1_offset);
    for (uint32_t g : {0u, 1u, 2u}) CHECK(ReadGuest(img, g * kCs, kCs) == Pattern(g));
  }
}

TEST_CASE("guest data on metadata that qemu-img's repair leaves in place is still reported") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "qemu-fixed.qcow2";
  MakeImage(img);
  {
    ImageBytes raw(img);
    raw.SetL2(3, raw.header().l1_offset | kFlagCopied);
  }
  REQUIRE(QemuImgCheck(img, "all").exit_code == 0);
  // qemu-img now sees nothing wrong (the L1 table has refcount 2), but guest
  // writes to guest cluster 3 would still land... on a copy; the table is
  // shared with guest data all the same.
  const CheckReport r = OurCheck(img);
  CHECK(r.corruptions == 0);  // as qemu-img counts
  CHECK(r.overlaps == 1);     // ours
  CHECK(CheckExitCode(r) == 2);
  CHECK(QemuImgCheck(img).exit_code == 0);
  const std::string before_view = GuestView(img, dir / "before.raw");
  const CheckReport fixed = OurCheck(img, RepairMode::kAll);
  CHECK(CheckExitCode(fixed) == 0);
  CHECK(QemuImgCheck(img).exit_code == 0);
  CHECK(GuestView(img, dir / "after.raw") == before_view);
}

TEST_CASE("a data cluster changed behind the index's back: only our check sees it; repair forgets the old hash") {
  RequireQemu();
  // Guest 2's host cluster is its own; guest 1's is shared with guest 6.
  for (uint32_t g : {2u, 1u}) {
    CAPTURE(g);
    TempDir dir;
    const std::string img = dir / "behind.qcow2";
    MakeImage(img);
    const std::vector<uint8_t> changed = Pattern(99);
    const uint64_t host = ImageBytes(img).HostCluster(g);
    ImageBytes(img).Write(host * kCs, changed);

    const Outcome o = JudgeAndRepair(dir, img, {2, 0});
    CHECK(o.before.corruptions == 0);  // the qcow2 structure is fine...
    CHECK(o.before.leaks == 0);
    CHECK(o.before.dedup.mismatched == 1);  // ...but the index names the old hash for the cluster
    CHECK(o.before.dedup.missing == 1);     // and lacks what it holds now
    CHECK(o.before.dedup.stale == 0);
    CHECK(HasMessage(o.before, "ERROR dedup index entry for cluster " + std::to_string(host)));
    CHECK(o.repaired.dedup.rebuilt);
    CHECK(o.repaired.dedup.in_sync);
    CHECK(o.repaired.dedup.errors() == 0);
    // What the rebuild mended is listed as qemu-img lists what it mends.
    CHECK(HasMessage(o.repaired, "Repairing dedup index entry for cluster " + std::to_string(host)));
    CHECK_FALSE(HasMessage(o.repaired, "ERROR"));
    CHECK(ReadGuest(img, g * kCs, kCs) == changed);

    // Writing the original content again must store it anew, not link it
    // to the cluster that no longer holds it...
    {
      auto w = Image::Open(img, OpenOptions{.writable = true});
      REQUIRE_MESSAGE(w.ok(), w.status().message());
      REQUIRE((*w)->Write(8 * kCs, Pattern(g)).ok());
      CHECK((*w)->write_stats().dedup_hits == 0);
      // ...while the changed content is found where it is.
      REQUIRE((*w)->Write(9 * kCs, changed).ok());
      CHECK((*w)->write_stats().dedup_hits == 1);
      REQUIRE((*w)->Close().ok());
    }
    {
      ImageBytes after(img);
      CHECK(after.HostCluster(8) != host);
      CHECK(after.HostCluster(9) == host);
      CHECK(after.Refcount(host) == (g == 1 ? 3 : 2));
    }
    CHECK(ReadGuest(img, 8 * kCs, kCs) == Pattern(g));
    CHECK(ReadGuest(img, 9 * kCs, kCs) == changed);
    CHECK(ReadGuest(img, g * kCs, kCs) == changed);
    const CheckReport last = OurCheck(img);
    INFO(Messages(last));
    CHECK(CheckExitCode(last) == 0);
    CHECK(QemuImgCheck(img).exit_code == 0);
  }
}

TEST_CASE("a data cluster changed behind the index's back: without a repair the writer does not link to it either") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "behind-unrepaired.qcow2";
  MakeImage(img);
  const std::vector<uint8_t> changed = Pattern(99);
  const uint64_t host = ImageBytes(img).HostCluster(2);
  ImageBytes(img).Write(host * kCs, changed);
  {
    auto w = Image::Open(img, OpenOptions{.writable = true});
    REQUIRE_MESSAGE(w.ok(), w.status().message());
    REQUIRE((*w)->Write(8 * kCs, Pattern(2)).ok());
    CHECK((*w)->write_stats().dedup_hits == 0);
    REQUIRE((*w)->Close().ok());
  }
  CHECK(ImageBytes(img).HostCluster(8) != host);
  CHECK(ReadGuest(img, 8 * kCs, kCs) == Pattern(2));
  CHECK(ReadGuest(img, 2 * kCs, kCs) == changed);
  CHECK(QemuImgCheck(img).exit_code == 0);
  // The writer dropped the entry it found lying and indexed what the
  // cluster does hold: the image checks clean.
  const CheckReport r = OurCheck(img);
  INFO(Messages(r));
  CHECK(r.dedup.in_sync);
  CHECK(r.dedup.mismatched == 0);
  CHECK(r.dedup.missing == 0);
  CHECK(r.corruptions == 0);
  CHECK(CheckExitCode(r) == 0);
  {
    // And the changed content is now found where it is.
    auto w = Image::Open(img, OpenOptions{.writable = true});
    REQUIRE(w.ok());
    REQUIRE((*w)->Write(9 * kCs, changed).ok());
    CHECK((*w)->write_stats().dedup_hits == 1);
    REQUIRE((*w)->Close().ok());
  }
  CHECK(ImageBytes(img).HostCluster(9) == host);
}

TEST_CASE("an index entry left for a freed cluster is stale") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "stale.qcow2";
  MakeImage(img);
  {
    // Guest 3 is unmapped and its cluster freed, consistently for qemu-img,
    // but the index still names the cluster.
    ImageBytes raw(img);
    const uint64_t c = raw.HostCluster(3);
    raw.SetL2(3, 0);
    raw.SetRefcount(c, 0);
  }
  const Outcome o = JudgeAndRepair(dir, img, {2, 0});
  CHECK(o.before.corruptions == 0);
  CHECK(o.before.leaks == 0);
  CHECK(o.before.dedup.stale == 1);
  CHECK(o.before.dedup.mismatched == 0);
  CHECK(o.before.dedup.missing == 0);
  CHECK(HasMessage(o.before, "the cluster holds no guest data"));
  CHECK(o.repaired.dedup.rebuilt);
  CHECK(o.repaired.dedup.indexed == 3);
  CHECK(o.repaired.dedup.stored_clusters == 3);
  CHECK(ReadGuest(img, 3 * kCs, kCs) == std::vector<uint8_t>(kCs, 0));
  // The freed data is stored again when written again, not linked.
  {
    auto w = Image::Open(img, OpenOptions{.writable = true});
    REQUIRE_MESSAGE(w.ok(), w.status().message());
    REQUIRE((*w)->Write(9 * kCs, Pattern(3)).ok());
    CHECK((*w)->write_stats().dedup_hits == 0);
    REQUIRE((*w)->Close().ok());
  }
  CHECK(ReadGuest(img, 9 * kCs, kCs) == Pattern(3));
  CHECK(CheckExitCode(OurCheck(img)) == 0);
  CHECK(QemuImgCheck(img).exit_code == 0);
}

// Keeps only the stored index entries keep() accepts, and makes the header
// vouch for what is left.
static void KeepIndexEntries(const std::string& img, const std::function<bool(uint64_t offset)>& keep) {
  testing::RewriteStoredIndex(img, [&](DedupIndex& index) {
    DedupIndex kept;
    index.ForEach([&](Fingerprint key, uint64_t c) {
      if (keep(c * kCs)) kept.Insert(key, c);
    });
    REQUIRE(kept.size() < index.size());
    index = std::move(kept);
  });
}

TEST_CASE("an entry removed from the stored index is missing") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "missing.qcow2";
  MakeImage(img);
  REQUIRE(ImageBytes(img).header().dedup->index_entries == 4);
  const uint64_t gone = ImageBytes(img).HostCluster(3);
  KeepIndexEntries(img, [&](uint64_t offset) { return offset != gone * kCs; });
  const Outcome o = JudgeAndRepair(dir, img, {2, 0});
  CHECK(o.before.dedup.missing == 1);
  CHECK(o.before.dedup.mismatched == 0);
  CHECK(o.before.dedup.stale == 0);
  CHECK(HasMessage(o.before, "ERROR dedup index: no entry for the data stored in cluster " + std::to_string(gone)));
  CHECK(o.repaired.dedup.indexed == 4);
}

// The index holds every stored copy (so that freeing one leaves the data
// findable): a copy the index lacks is missing even when another copy of
// the same data is indexed.
TEST_CASE("a stored copy missing from the index is missing, though another copy is indexed") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "missing-copy.qcow2";
  MakeImage(img, 1);  // one-bit refcounts: nothing shared, guest 0, 4 and 5 are three copies
  {
    const CheckReport r = OurCheck(img);
    REQUIRE(CheckExitCode(r) == 0);
    REQUIRE(r.dedup.indexed == r.dedup.stored_clusters);
  }
  const uint64_t gone = ImageBytes(img).HostCluster(5);
  REQUIRE(gone != ImageBytes(img).HostCluster(0));
  KeepIndexEntries(img, [&](uint64_t offset) { return offset != gone * kCs; });
  const Outcome o = JudgeAndRepair(dir, img, {2, 0});
  CHECK(o.before.dedup.missing == 1);
  CHECK(o.before.dedup.mismatched == 0);
  CHECK(o.before.dedup.stale == 0);
  CHECK(o.before.dedup.duplicates == 3);
  CHECK(HasMessage(o.before, "ERROR dedup index: no entry for the data stored in cluster " + std::to_string(gone)));
  CHECK(o.repaired.dedup.indexed == o.repaired.dedup.stored_clusters);
}

// The 4 entries cannot be read: none is stale (none was read), each of the
// 4 stored clusters lacks its entry, and that is the count, once each.
TEST_CASE("an index cut short by the end of the file is counted once: every stored cluster missing") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "cut.qcow2";
  MakeImage(img);
  const DedupExtension ext = *ImageBytes(img).header().dedup;
  REQUIRE(ext.index_entries == 4);
  std::filesystem::resize_file(img, ext.index_offset + kIndexEntryBytes * 2 + 5);  // inside the first bucket
  const Outcome o = JudgeAndRepair(dir, img, {2, 0});
  CHECK_FALSE(o.before.dedup.index_loaded);
  CHECK(o.before.dedup.unreadable);
  CHECK(o.before.dedup.stored_clusters == 4);
  CHECK(o.before.dedup.stale == 0);
  CHECK(o.before.dedup.missing == 4);
  CHECK(o.before.dedup.errors() == 4);
  // One finding says why, in the dedup index's area.
  REQUIRE(o.before.findings.size() == 1);
  CHECK(o.before.findings[0].area == FindingArea::kDedupIndex);
  CHECK(o.before.findings[0].kind == FindingKind::kError);
  CHECK(o.before.findings[0].text ==
        fmt::format("ERROR dedup index: the index table at {:#x} ({} bytes) does not fit in the file",
                    ext.index_offset, IndexTableBytes(ext.index_buckets)));
  CHECK(o.repaired.dedup.rebuilt);
  CHECK(o.repaired.dedup.indexed == 4);
  // The repair says what it mended, worded as qemu-img words a repair.
  REQUIRE(!o.repaired.findings.empty());
  CHECK(o.repaired.findings[0].kind == FindingKind::kRepaired);
  CHECK(o.repaired.findings[0].text.rfind("Repairing dedup index: the index table at", 0) == 0);
}

// Findings are data: the write path and the CLI go by area and kind, not
// by the words of a line.
TEST_CASE("findings carry their area, kind and cluster") {
  TempDir dir;
  const std::string img = dir / "findings.qcow2";
  MakeImage(img);
  uint64_t shared = 0, l1_cluster = 0;
  {
    ImageBytes raw(img);
    shared = raw.HostCluster(1);       // refcount 2, shared by guest 1 and 6
    raw.SetRefcount(shared, 1);        // too low: a corruption, and COPIED now looks wrong
    l1_cluster = raw.header().l1_offset / kCs;
    raw.SetRefcount(l1_cluster, 2);    // too high: a leak
  }
  const CheckReport r = OurCheck(img);
  INFO(Messages(r));
  auto count = [&r](FindingArea a, FindingKind k) {
    return std::count_if(r.findings.begin(), r.findings.end(),
                         [&](const Finding& f) { return f.area == a && f.kind == k; });
  };
  CHECK(count(FindingArea::kRefcounts, FindingKind::kError) == 1);
  CHECK(count(FindingArea::kRefcounts, FindingKind::kLeak) == 1);
  CHECK(count(FindingArea::kCopiedFlags, FindingKind::kError) == 2);
  CHECK(count(FindingArea::kDedupIndex, FindingKind::kError) == 0);
  for (const Finding& f : r.findings) {
    if (f.area == FindingArea::kRefcounts && f.kind == FindingKind::kError) {
      CHECK(f.cluster == shared);
      CHECK(f.text == fmt::format("ERROR cluster {} refcount=1 reference=2", shared));
    }
    if (f.kind == FindingKind::kLeak) {
      CHECK(f.cluster == l1_cluster);
      CHECK(f.text == fmt::format("Leaked cluster {} refcount=2 reference=1", l1_cluster));
    }
    if (f.area == FindingArea::kCopiedFlags) {
      CHECK(f.cluster == shared);
    }
  }
}

TEST_CASE("an index the header no longer vouches for is not an error") {
  TempDir dir;
  const std::string img = dir / "outofsync.qcow2";
  MakeImage(img);
  {
    ImageBytes raw(img);
    raw.Write(raw.HostCluster(2) * kCs, Pattern(99));  // the index is wrong...
    raw.Set64(88, raw.header().autoclear & ~kAutoclearDedupInSync);  // ...and says so
  }
  const CheckReport r = OurCheck(img);
  CHECK_FALSE(r.dedup.in_sync);
  CHECK(r.dedup.errors() == 0);
  CHECK(CheckExitCode(r) == 0);
  // -r leaks leaves it to the writer; -r all rebuilds it.
  CHECK_FALSE(OurCheck(img, RepairMode::kLeaks).dedup.rebuilt);
  const CheckReport all = OurCheck(img, RepairMode::kAll);
  CHECK(all.dedup.rebuilt);
  CHECK(all.dedup.in_sync);
  CHECK(all.dedup.errors() == 0);
}

TEST_CASE("an in-sync index of a hash algorithm not ours is not checked, and no error") {
  TempDir dir;
  const std::string img = dir / "newer.qcow2";
  MakeImage(img);
  {
    ImageBytes raw(img);
    Header h = raw.header();
    REQUIRE(h.dedup);
    h.dedup->hash_algorithm = 77;
    auto head = EncodeHeader(h);
    REQUIRE(head.ok());
    raw.Write(0, *head);
  }
  const CheckReport r = OurCheck(img);
  INFO(Messages(r));
  CHECK(r.dedup.in_sync);
  CHECK_FALSE(r.dedup.index_loaded);
  CHECK(r.dedup.errors() == 0);
  CHECK(CheckExitCode(r) == 0);
  CHECK(HasMessage(r, "Dedup index not checked: unknown hash algorithm 77"));
  CHECK_FALSE(HasMessage(r, "ERROR"));
}

TEST_CASE("a dirty image after a crash: reported as found, repaired by -r all or by opening it for writing") {
  RequireQemu();
  TempDir dir;
  const std::string img = dir / "dirty.qcow2";
  MakeImage(img);
  {
    auto w = Image::Open(img, OpenOptions{.writable = true});
    REQUIRE(w.ok());
    // Overwrite guest 1 (shared with 6) and 2, then "crash" after a flush:
    // the header says dirty and the index is out of sync.
    REQUIRE((*w)->Write(1 * kCs, Pattern(11)).ok());
    REQUIRE((*w)->Write(2 * kCs, Pattern(12)).ok());
    REQUIRE((*w)->Flush().ok());
  }
  {
    // The crash also left a refcount too high.
    ImageBytes raw(img);
    REQUIRE((raw.header().incompatible & kIncompatDirty) != 0);
    raw.SetRefcount(0, 2);
  }
  {
    // Opening a copy for writing repairs it first, as QEMU does.
    const std::string copy = dir / "dirty-copy.qcow2";
    std::filesystem::copy_file(img, copy);
    auto w = Image::Open(copy, OpenOptions{.writable = true});
    REQUIRE_MESSAGE(w.ok(), w.status().message());
    REQUIRE((*w)->Close().ok());
    w->reset();
    auto checked = CheckImage(copy, CheckOptions{});
    REQUIRE(checked.ok());
    CHECK(CheckExitCode(*checked) == 0);
    CHECK(ReadGuest(copy, 1 * kCs, kCs) == Pattern(11));
    CHECK(ReadGuest(copy, 6 * kCs, kCs) == Pattern(1));
  }
  const Outcome o = JudgeAndRepair(dir, img, {3, 3});
  CHECK_FALSE(o.before.dedup.in_sync);
  ImageBytes raw(img);
  CHECK((raw.header().incompatible & kIncompatDirty) == 0);
  CHECK(raw.header().dedup_in_sync());
  CHECK(ReadGuest(img, 1 * kCs, kCs) == Pattern(11));
  CHECK(ReadGuest(img, 6 * kCs, kCs) == Pattern(1));
  auto w = Image::Open(img, OpenOptions{.writable = true});
  CHECK(w.ok());
}

TEST_CASE("a dirty image with nothing wrong: -r all and -r leaks clear the dirty bit, as QEMU does") {
  RequireQemu();
  for (RepairMode mode : {RepairMode::kLeaks, RepairMode::kAll}) {
    TempDir dir;
    const std::string img = dir / "dirty-clean.qcow2";
    MakeImage(img);
    {
      ImageBytes raw(img);
      raw.Set64(72, raw.header().incompatible | kIncompatDirty);
    }
    const std::string copy = dir / "copy.qcow2";
    CopyFile(img, copy);
    CHECK(CheckExitCode(OurCheck(img)) == 0);
    CHECK(CheckExitCode(OurCheck(img, mode)) == 0);
    REQUIRE(QemuImgCheck(copy, mode == RepairMode::kAll ? "all" : "leaks").exit_code == 0);
    CHECK((ImageBytes(img).header().incompatible & kIncompatDirty) == 0);
    CHECK((ImageBytes(copy).header().incompatible & kIncompatDirty) == 0);
  }
}

TEST_CASE("damage beyond the end of the file: same verdict as qemu-img, no crash") {
  RequireQemu();
  struct Case {
    const char* name;
    std::function<void(ImageBytes&)> damage;
    // Compressed entries whose bytes do not decompress: lost guest data,
    // which only we see (qemu-img check reads no data), before and after
    // any repair.
    uint64_t bad_compressed = 0;
  };
  const std::vector<Case> cases = {
      {"L2 entry far past the end", [](ImageBytes& r) { r.SetL2(2, (1ull << 54) | kFlagCopied); }},
      {"L2 entry misaligned", [](ImageBytes& r) { r.SetL2(2, (r.L2(2) + 512)); }},
      {"L2 entry with reserved bits", [](ImageBytes& r) { r.SetL2(2, r.L2(2) | 2); }},
      {"L1 entry far past the end", [](ImageBytes& r) { r.Set64(r.header().l1_offset, (1ull << 50) | kFlagCopied); }},
      {"compressed entry with COPIED",
       [](ImageBytes& r) { r.SetL2(2, EncodeCompressed(r.HostCluster(2) * kCs, 100, 16) | kFlagCopied); }, 1},
      {"refcount block past the end", [](ImageBytes& r) { r.Set64(r.header().reftable_offset, 1ull << 40); }},
      {"refcount block misaligned", [](ImageBytes& r) { r.Set64(r.header().reftable_offset, r.Get64(r.header().reftable_offset) + 512); }},
      {"refcount table entry with reserved bits", [](ImageBytes& r) { r.Set64(r.header().reftable_offset, r.Get64(r.header().reftable_offset) | 1); }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    TempDir dir;
    const std::string img = dir / "hostile.qcow2";
    MakeImage(img);
    {
      ImageBytes raw(img);
      c.damage(raw);
    }
    const CheckReport r = OurCheck(img);
    const QemuCheckResult q = QemuImgCheck(img);
    INFO("ours:\n" << Messages(r) << "qemu-img:\n" << q.err);
    CHECK(CheckExitCode(r) == q.exit_code);
    CHECK(CheckExitCode(r) != 0);
    CHECK(r.bad_compressed == c.bad_compressed);
    // Repair: whatever qemu-img makes of the same damage, we end no worse.
    const std::string copy = dir / "copy.qcow2";
    CopyFile(img, copy);
    const QemuCheckResult qr = QemuImgCheck(copy, "all");
    auto ours = CheckImage(img, CheckOptions{.repair = RepairMode::kAll});
    REQUIRE(ours.ok());
    INFO("ours -r all:\n" << Messages(*ours) << "qemu-img -r all:\n" << qr.err);
    CHECK(ours->bad_compressed == c.bad_compressed);
    const int lost = c.bad_compressed ? 2 : 0;  // what only we see stays
    if (qr.exit_code == 0) CHECK(CheckExitCode(*ours) == lost);
    const int qemu_after = QemuImgCheck(img).exit_code;
    CHECK(CheckExitCode(*ours) == (qemu_after == 0 ? lost : qemu_after));
  }
}

namespace {

// A file that fails every read after the first n (fault injection).
class FailingFile : public testing::ForwardingFile {
 public:
  FailingFile(std::unique_ptr<File> f, int reads) : ForwardingFile(std::move(f)), left_(reads) {}
  Status ReadAt(uint64_t o, std::span<uint8_t> b) override {
    if (left_-- <= 0) return Status::IOError("injected read failure");
    return ForwardingFile::ReadAt(o, b);
  }
  Status ReadUncached(uint64_t o, std::span<uint8_t> b) override { return ReadAt(o, b); }

 private:
  int left_;
};

}  // namespace

TEST_CASE("a failing read ends the check with an error, never a verdict") {
  TempDir dir;
  const std::string img = dir / "faulty.qcow2";
  MakeImage(img);
  for (int reads = 0; reads < 12; ++reads) {
    CAPTURE(reads);
    auto f = OpenPosixFile(img, OpenMode::kReadOnly);
    REQUIRE(f.ok());
    CheckOptions o;
    o.file = std::make_unique<FailingFile>(std::move(f).value(), reads);
    auto r = CheckImage(img, std::move(o));
    if (r.ok()) CHECK(CheckExitCode(*r) == 0);  // all reads done before the failure
    else CHECK(r.status().kind() == ErrorKind::kIOError);
  }
}

TEST_CASE("check takes QEMU's lock: a shared lock for reading, exclusive for repair") {
  testing::RequireCommand("qemu-img");
  testing::RequireCommand("qemu-io");
  TempDir dir;
  const std::string img = dir / "locked.qcow2";
  MakeImage(img);
  // While qemu-io holds the image read-write, repair must refuse; a plain
  // check too (QEMU refuses to share write), unless forced.
  const std::string fifo = dir / "fifo", out = dir / "qemu-io.out";
  REQUIRE(Run("mkfifo " + Sh(fifo)).exit_code == 0);
  BackgroundProcess holder("exec qemu-io " + Sh(img) + " <" + Sh(fifo) + " >" + Sh(out) + " 2>&1");
  std::signal(SIGPIPE, SIG_IGN);  // should qemu-io be gone, "quit" below must not kill the test
  std::ofstream keep(fifo);       // qemu-io runs until this closes
  // qemu-io opens the image, locks and all, before it reads a command: once
  // it has answered one, it holds the image (no race with our own locks).
  keep << "length\n" << std::flush;
  REQUIRE_MESSAGE(WaitFor([&] { return ReadFileBytes(out).find('\n') != std::string::npos; }, 30),
                  ReadFileBytes(out));
  REQUIRE_MESSAGE(holder.Running(), ReadFileBytes(out));
  auto repair = CheckImage(img, CheckOptions{.repair = RepairMode::kAll});
  CHECK_FALSE(repair.ok());
  if (!repair.ok()) CHECK(repair.status().kind() == ErrorKind::kBusy);
  auto plain = CheckImage(img, CheckOptions{});
  CHECK_FALSE(plain.ok());
  if (!plain.ok()) CHECK(plain.status().kind() == ErrorKind::kBusy);
  auto forced = CheckImage(img, CheckOptions{.force_share = true});
  CHECK(forced.ok());
  keep << "quit\n";
  keep.close();
  CHECK(holder.Wait(30) == 0);
}
