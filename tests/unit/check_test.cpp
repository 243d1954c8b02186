// check through the library: images we write, damaged on purpose byte by
// byte, judged by CheckImage and by `qemu-img check` on the same file, then
// repaired and judged again. qemu-img is the referee for everything but the
// dedup index, which it cannot see.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include <unistd.h>

#include "dedup/index_store.h"
#include "dedup/sha256.h"
#include "format/endian.h"
#include "format/entries.h"
#include "format/header.h"
#include "format/refcount_block.h"
#include "qcow2dedup/check.h"
#include "qcow2dedup/image.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Run;
using testing::Sh;
using testing::TempDir;

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

// Direct access to the bytes of an image, for damaging it.
class Raw {
 public:
  explicit Raw(const std::string& path) {
    auto f = OpenPosixFile(path, OpenMode::kReadWrite);
    REQUIRE(f.ok());
    file_ = std::move(f).value();
    auto size = file_->Size();
    REQUIRE(size.ok());
    std::vector<uint8_t> head(std::min<uint64_t>(*size, kCs));
    REQUIRE(file_->ReadAt(0, head).ok());
    auto h = ParseHeader(head, *size);
    REQUIRE(h.ok());
    h_ = *h;
  }
  const Header& header() const { return h_; }
  uint64_t Get64(uint64_t at) {
    uint8_t b[8];
    REQUIRE(file_->ReadAt(at, b).ok());
    return LoadBe64(b);
  }
  void Set64(uint64_t at, uint64_t v) {
    uint8_t b[8];
    StoreBe64(b, v);
    REQUIRE(file_->WriteAt(at, b).ok());
  }
  uint64_t L2EntryAt(uint64_t guest_cluster) {
    const uint64_t l1 = Get64(h_.l1_offset + guest_cluster / h_.l2_entries() * 8);
    REQUIRE((l1 & kOffsetMask) != 0);
    return (l1 & kOffsetMask) + guest_cluster % h_.l2_entries() * 8;
  }
  uint64_t L2(uint64_t g) { return Get64(L2EntryAt(g)); }
  void SetL2(uint64_t g, uint64_t e) { Set64(L2EntryAt(g), e); }
  uint64_t HostCluster(uint64_t g) { return (L2(g) & kOffsetMask) / h_.cluster_size(); }
  uint64_t L2TableCluster(uint64_t g) { return L2EntryAt(g) / h_.cluster_size(); }

  uint64_t Refcount(uint64_t c) {
    std::vector<uint8_t> block(h_.cluster_size());
    REQUIRE(file_->ReadAt(BlockAt(c), block).ok());
    return GetRefcount(block.data(), h_.refcount_order, c % h_.refblock_entries());
  }
  void SetRefcountOf(uint64_t c, uint64_t v) {
    std::vector<uint8_t> block(h_.cluster_size());
    const uint64_t at = BlockAt(c);
    REQUIRE(file_->ReadAt(at, block).ok());
    SetRefcount(block.data(), h_.refcount_order, c % h_.refblock_entries(), v);
    REQUIRE(file_->WriteAt(at, block).ok());
  }
  void Write(uint64_t at, std::span<const uint8_t> data) { REQUIRE(file_->WriteAt(at, data).ok()); }
  std::vector<uint8_t> Read(uint64_t at, size_t n) {
    std::vector<uint8_t> v(n);
    REQUIRE(file_->ReadAt(at, v).ok());
    return v;
  }

 private:
  uint64_t BlockAt(uint64_t c) {
    const uint64_t e = Get64(h_.reftable_offset + c / h_.refblock_entries() * 8);
    REQUIRE(e != 0);
    return e;
  }
  std::unique_ptr<File> file_;
  Header h_;
};

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

// Our numbers against qemu-img's for the same file.
void SameAsQemu(const CheckReport& ours, const QemuCheck& q) {
  INFO("ours:\n" << Messages(ours) << "qemu-img:\n" << q.err << q.json.dump());
  CHECK(CheckExitCode(ours) == q.exit_code);
  CHECK(ours.corruptions == q.Get("corruptions"));
  CHECK(ours.leaks == q.Get("leaks"));
  CHECK(ours.image_end_offset == q.Get("image-end-offset"));
  CHECK(ours.total_clusters == q.Get("total-clusters"));
  CHECK(ours.allocated_clusters == q.Get("allocated-clusters"));
  CHECK(ours.fragmented_clusters == q.Get("fragmented-clusters"));
  CHECK(ours.compressed_clusters == q.Get("compressed-clusters"));
}

// The guest view as qemu-img sees it, independent of our reader.
std::string GuestView(const std::string& image, const std::string& raw) {
  auto r = Run("qemu-img convert -U -O raw " + Sh(image) + " " + Sh(raw));
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  std::ifstream f(raw, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void Copy(const std::string& from, const std::string& to) {
  std::filesystem::copy_file(from, to, std::filesystem::copy_options::overwrite_existing);
}

// Damage, judge with both tools, repair a copy with qemu-img and the
// original with us, and judge both repairs with both tools.
struct Outcome {
  CheckReport before, repaired;
  QemuCheck qemu_before, qemu_repair;
};

// same_as_qemu_repair: whether qemu-img's own repair ends clean for us too
// (not so where it leaves guest data on metadata).
Outcome JudgeAndRepair(const TempDir& dir, const std::string& img, int want_exit, bool same_as_qemu_repair = true) {
  Outcome o;
  o.before = Ours(img);
  o.qemu_before = Qemu(img);
  SameAsQemu(o.before, o.qemu_before);
  CHECK(CheckExitCode(o.before) == want_exit);

  const std::string before_view = GuestView(img, dir / "before.raw");
  const std::string qcopy = dir / "qemu-repaired.qcow2";
  Copy(img, qcopy);
  o.qemu_repair = Qemu(qcopy, "all");
  o.repaired = Ours(img, RepairMode::kAll);
  INFO("ours:\n" << Messages(o.repaired) << "qemu-img -r all:\n" << o.qemu_repair.err);
  CHECK(CheckExitCode(o.repaired) == 0);
  if (same_as_qemu_repair) {
    CHECK(o.repaired.leaks_fixed == o.qemu_repair.Get("leaks-fixed"));
    CHECK(o.repaired.corruptions_fixed == o.qemu_repair.Get("corruptions-fixed"));
  }
  // Repaired by us: clean for both tools, same guest data.
  const CheckReport again = Ours(img);
  const QemuCheck q = Qemu(img);
  SameAsQemu(again, q);
  CHECK(q.exit_code == 0);
  CHECK(CheckExitCode(again) == 0);
  CHECK(GuestView(img, dir / "after.raw") == before_view);
  // And our check agrees with qemu-img about qemu-img's own repair.
  if (same_as_qemu_repair) SameAsQemu(Ours(qcopy), Qemu(qcopy));
  return o;
}

std::vector<uint8_t> ReadGuest(const std::string& path, uint64_t offset, size_t n) {
  auto img = Image::Open(path, {});
  REQUIRE_MESSAGE(img.ok(), img.status().message());
  std::vector<uint8_t> buf(n);
  REQUIRE((*img)->Read(offset, buf).ok());
  return buf;
}

bool QemuAvailable() {
  static bool have = testing::HaveCommand("qemu-img");
  return have;
}

}  // namespace

TEST_CASE("a fresh dedup image is clean, as qemu-img says too") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::vector<std::pair<uint32_t, uint32_t>> variants = {
      {1, 65536}, {16, 65536}, {64, 65536}, {16, 512}, {2, 512}, {16, 2u << 20}};
  for (auto [bits, cs] : variants) {
    CAPTURE(bits);
    CAPTURE(cs);
    const std::string img = dir / ("clean" + std::to_string(bits) + "-" + std::to_string(cs) + ".qcow2");
    MakeImage(img, bits, cs);
    const CheckReport r = Ours(img);
    SameAsQemu(r, Qemu(img));
    CHECK(CheckExitCode(r) == 0);
    CHECK(r.messages.empty());
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
    auto before = Raw(img).Read(0, std::filesystem::file_size(img));
    const CheckReport rep = Ours(img, RepairMode::kAll);
    CHECK(CheckExitCode(rep) == 0);
    CHECK(Raw(img).Read(0, std::filesystem::file_size(img)) == before);
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
  const CheckReport r = Ours(img);
  CHECK(r.dedup.missing == 0);
  CHECK(CheckExitCode(r) == 0);
}

TEST_CASE("a raised refcount is a leak; -r leaks frees it") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::string img = dir / "leak.qcow2";
  MakeImage(img);
  {
    Raw raw(img);
    const uint64_t shared = raw.HostCluster(0);  // refcount 3, COPIED clear: 4 does not change COPIED
    REQUIRE(raw.Refcount(shared) == 3);
    raw.SetRefcountOf(shared, 4);
    raw.SetRefcountOf(raw.header().l1_offset / kCs, 2);  // metadata has no COPIED flag to disagree
  }
  const CheckReport r = Ours(img);
  SameAsQemu(r, Qemu(img));
  CHECK(CheckExitCode(r) == 3);
  CHECK(r.leaks == 2);
  CHECK(Messages(r).find("Leaked cluster") != std::string::npos);

  const std::string copy = dir / "copy.qcow2";
  Copy(img, copy);
  const CheckReport fixed = Ours(img, RepairMode::kLeaks);
  const QemuCheck q = Qemu(copy, "leaks");
  CHECK(CheckExitCode(fixed) == 0);
  CHECK(fixed.leaks_fixed == 2);
  CHECK(fixed.leaks_fixed == q.Get("leaks-fixed"));
  CHECK(Qemu(img).exit_code == 0);
  // The index was right before and -r leaks leaves it in sync.
  CHECK(fixed.dedup.in_sync);
  CHECK(fixed.dedup.errors() == 0);
}

TEST_CASE("a lowered refcount is a corruption; -r leaks cannot fix it, -r all can") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::string img = dir / "low.qcow2";
  MakeImage(img);
  {
    Raw raw(img);
    raw.SetRefcountOf(raw.HostCluster(1), 1);  // shared by guest 1 and 6, COPIED clear on both
  }
  const CheckReport leaks_only = Ours(img, RepairMode::kLeaks);
  CHECK(CheckExitCode(leaks_only) == 2);
  CHECK(Qemu(img).exit_code == 2);
  const Outcome o = JudgeAndRepair(dir, img, 2);
  CHECK(o.before.corruptions == 3);  // the refcount, and COPIED on two entries that now look unshared
  CHECK(ReadGuest(img, 6 * kCs, kCs) == Pattern(1));
}

TEST_CASE("a referenced cluster with refcount 0 makes -r all rebuild the refcount structure") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::string img = dir / "zero.qcow2";
  MakeImage(img);
  {
    Raw raw(img);
    raw.SetRefcountOf(raw.HostCluster(2), 0);
    raw.SetRefcountOf(raw.HostCluster(0), 0);
  }
  {
    // -r leaks cannot rebuild: qemu-img gives up (exit 1), and so do we.
    const std::string a = dir / "leaks-ours.qcow2", b = dir / "leaks-qemu.qcow2";
    Copy(img, a);
    Copy(img, b);
    const CheckReport r = Ours(a, RepairMode::kLeaks);
    CHECK(Messages(r).find("ERROR need to rebuild refcount structures") != std::string::npos);
    CHECK(CheckExitCode(r) == 1);
    CHECK(Qemu(b, "leaks").exit_code == 1);
  }
  const Outcome o = JudgeAndRepair(dir, img, 2);
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
  CHECK(Qemu(img).exit_code == 0);
  CHECK(CheckExitCode(Ours(img)) == 0);
}

TEST_CASE("COPIED flipped on an L2 entry is a corruption") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::string img = dir / "copied.qcow2";
  MakeImage(img);
  {
    Raw raw(img);
    REQUIRE((raw.L2(2) & kFlagCopied) != 0);
    raw.SetL2(2, raw.L2(2) & ~kFlagCopied);   // unshared cluster without COPIED
    REQUIRE((raw.L2(4) & kFlagCopied) == 0);
    raw.SetL2(4, raw.L2(4) | kFlagCopied);    // shared cluster with COPIED: a write would change guest 0 and 5
  }
  const Outcome o = JudgeAndRepair(dir, img, 2);
  CHECK(o.before.corruptions == 2);
  CHECK(Messages(o.before).find("ERROR OFLAG_COPIED data cluster: l2_entry=") != std::string::npos);
  Raw raw(img);
  CHECK((raw.L2(2) & kFlagCopied) != 0);
  CHECK((raw.L2(4) & kFlagCopied) == 0);
}

TEST_CASE("COPIED flipped on an L1 entry is a corruption") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::string img = dir / "l1copied.qcow2";
  MakeImage(img);
  {
    Raw raw(img);
    const uint64_t e = raw.Get64(raw.header().l1_offset);
    raw.Set64(raw.header().l1_offset, e & ~kFlagCopied);
  }
  const Outcome o = JudgeAndRepair(dir, img, 2);
  CHECK(Messages(o.before).find("OFLAG_COPIED L2 cluster: l1_index=0") != std::string::npos);
}

TEST_CASE("an L2 entry pointing at metadata is a corruption; repair moves the guest data off it") {
  if (!QemuAvailable()) return;
  for (const char* target : {"l1", "reftable", "refblock", "l2"}) {
    CAPTURE(target);
    TempDir dir;
    const std::string img = dir / "overlap.qcow2";
    MakeImage(img);
    {
      Raw raw(img);
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
    const Outcome o = JudgeAndRepair(dir, img, 2, false);
    CHECK((Messages(o.before).find("shares its cluster") != std::string::npos ||
           Messages(o.before).find("ERROR refcount block 0 refcount=2") != std::string::npos));
    CHECK(o.repaired.corruptions_fixed >= 1);
    // Our reader accepts the result: guest 3 is now data of its own.
    Raw raw(img);
    CHECK(raw.HostCluster(3) * kCs != raw.header().l1_offset);
    for (uint32_t g : {0u, 1u, 2u}) CHECK(ReadGuest(img, g * kCs, kCs) == Pattern(g));
  }
}

TEST_CASE("guest data on metadata that qemu-img's repair leaves in place is still reported") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::string img = dir / "qemu-fixed.qcow2";
  MakeImage(img);
  {
    Raw raw(img);
    raw.SetL2(3, raw.header().l1_offset | kFlagCopied);
  }
  REQUIRE(Qemu(img, "all").exit_code == 0);
  // qemu-img now sees nothing wrong (the L1 table has refcount 2), but guest
  // writes to guest cluster 3 would still land... on a copy; the table is
  // shared with guest data all the same.
  const CheckReport r = Ours(img);
  CHECK(r.corruptions == 1);
  CHECK(CheckExitCode(r) == 2);
  CHECK(Qemu(img).exit_code == 0);
  const std::string before_view = GuestView(img, dir / "before.raw");
  const CheckReport fixed = Ours(img, RepairMode::kAll);
  CHECK(CheckExitCode(fixed) == 0);
  CHECK(Qemu(img).exit_code == 0);
  CHECK(GuestView(img, dir / "after.raw") == before_view);
}

TEST_CASE("a data cluster changed behind the index's back: only our check sees it, and repair forgets it") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::string img = dir / "behind.qcow2";
  MakeImage(img);
  const std::vector<uint8_t> changed = Pattern(99);
  {
    Raw raw(img);
    raw.Write(raw.HostCluster(2) * kCs, changed);
  }
  const CheckReport r = Ours(img);
  const QemuCheck q = Qemu(img);
  CHECK(q.exit_code == 0);
  CHECK(r.corruptions == 0);  // the qcow2 structure is fine...
  CHECK(r.dedup.mismatched == 1);
  CHECK(r.dedup.missing == 1);
  CHECK(CheckExitCode(r) == 2);  // ...but the index would link new data to the wrong cluster

  const CheckReport fixed = Ours(img, RepairMode::kAll);
  CHECK(CheckExitCode(fixed) == 0);
  CHECK(fixed.dedup.rebuilt);
  CHECK(fixed.dedup.in_sync);
  CHECK(fixed.dedup.errors() == 0);
  CHECK(Qemu(img).exit_code == 0);
  CHECK(ReadGuest(img, 2 * kCs, kCs) == changed);

  // Writing the original content again must store it, not link it to the
  // cluster that no longer holds it.
  {
    auto w = Image::Open(img, OpenOptions{.writable = true});
    REQUIRE_MESSAGE(w.ok(), w.status().message());
    REQUIRE((*w)->Write(8 * kCs, Pattern(2)).ok());
    CHECK((*w)->write_stats().dedup_hits == 0);
    REQUIRE((*w)->Close().ok());
  }
  CHECK(ReadGuest(img, 8 * kCs, kCs) == Pattern(2));
  CHECK(ReadGuest(img, 2 * kCs, kCs) == changed);
  CHECK(CheckExitCode(Ours(img)) == 0);
  CHECK(Qemu(img).exit_code == 0);
}

TEST_CASE("an index entry left for a freed cluster is stale") {
  if (!QemuAvailable()) return;
  TempDir dir;
  const std::string img = dir / "stale.qcow2";
  MakeImage(img);
  {
    // Guest 3 is unmapped and its cluster freed, consistently for qemu-img,
    // but the index still names the cluster.
    Raw raw(img);
    const uint64_t c = raw.HostCluster(3);
    raw.SetL2(3, 0);
    raw.SetRefcountOf(c, 0);
  }
  const CheckReport r = Ours(img);
  CHECK(Qemu(img).exit_code == 0);
  CHECK(r.corruptions == 0);
  CHECK(r.leaks == 0);
  CHECK(r.dedup.stale == 1);
  CHECK(CheckExitCode(r) == 2);
  const CheckReport fixed = Ours(img, RepairMode::kAll);
  CHECK(CheckExitCode(fixed) == 0);
  CHECK(fixed.dedup.indexed == 3);
  CHECK(Qemu(img).exit_code == 0);
}

TEST_CASE("an index entry removed from the stored index is missing") {
  TempDir dir;
  const std::string img = dir / "missing.qcow2";
  MakeImage(img);
  {
    // Drop the last entry and make the header vouch for the shorter index.
    Raw raw(img);
    Header h = raw.header();
    REQUIRE(h.dedup);
    REQUIRE(h.dedup->index_entries == 4);
    h.dedup->index_entries = 3;
    auto bytes = raw.Read(h.dedup->index_offset, 3 * kIndexEntryBytes);
    h.dedup->index_digest = Sha256(bytes);
    auto head = EncodeHeader(h);
    REQUIRE(head.ok());
    raw.Write(0, *head);
  }
  const CheckReport r = Ours(img);
  CHECK(r.dedup.missing == 1);
  CHECK(r.dedup.mismatched == 0);
  CHECK(r.dedup.stale == 0);
  CHECK(CheckExitCode(r) == 2);
  CHECK(CheckExitCode(Ours(img, RepairMode::kAll)) == 0);
  CHECK(Ours(img).dedup.indexed == 4);
}

TEST_CASE("an index the header no longer vouches for is not an error") {
  TempDir dir;
  const std::string img = dir / "outofsync.qcow2";
  MakeImage(img);
  {
    Raw raw(img);
    raw.Write(raw.HostCluster(2) * kCs, Pattern(99));  // the index is wrong...
    raw.Set64(88, raw.header().autoclear & ~kAutoclearDedupInSync);  // ...and says so
  }
  const CheckReport r = Ours(img);
  CHECK_FALSE(r.dedup.in_sync);
  CHECK(r.dedup.errors() == 0);
  CHECK(CheckExitCode(r) == 0);
  // -r leaks leaves it to the writer; -r all rebuilds it.
  CHECK_FALSE(Ours(img, RepairMode::kLeaks).dedup.rebuilt);
  const CheckReport all = Ours(img, RepairMode::kAll);
  CHECK(all.dedup.rebuilt);
  CHECK(all.dedup.in_sync);
  CHECK(all.dedup.errors() == 0);
}

TEST_CASE("a dirty image after a crash: reported as found, repaired by -r all") {
  if (!QemuAvailable()) return;
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
    Raw raw(img);
    REQUIRE((raw.header().incompatible & kIncompatDirty) != 0);
    raw.SetRefcountOf(0, 2);
  }
  CHECK_FALSE(Image::Open(img, OpenOptions{.writable = true}).ok());
  const Outcome o = JudgeAndRepair(dir, img, 3);
  CHECK_FALSE(o.before.dedup.in_sync);
  Raw raw(img);
  CHECK((raw.header().incompatible & kIncompatDirty) == 0);
  CHECK(raw.header().dedup_in_sync());
  CHECK(ReadGuest(img, 1 * kCs, kCs) == Pattern(11));
  CHECK(ReadGuest(img, 6 * kCs, kCs) == Pattern(1));
  auto w = Image::Open(img, OpenOptions{.writable = true});
  CHECK(w.ok());
}

TEST_CASE("a dirty image with nothing wrong: -r all and -r leaks clear the dirty bit, as QEMU does") {
  if (!QemuAvailable()) return;
  for (RepairMode mode : {RepairMode::kLeaks, RepairMode::kAll}) {
    TempDir dir;
    const std::string img = dir / "dirty-clean.qcow2";
    MakeImage(img);
    {
      Raw raw(img);
      raw.Set64(72, raw.header().incompatible | kIncompatDirty);
    }
    const std::string copy = dir / "copy.qcow2";
    Copy(img, copy);
    CHECK(CheckExitCode(Ours(img)) == 0);
    CHECK(CheckExitCode(Ours(img, mode)) == 0);
    REQUIRE(Qemu(copy, mode == RepairMode::kAll ? "all" : "leaks").exit_code == 0);
    CHECK((Raw(img).header().incompatible & kIncompatDirty) == 0);
    CHECK((Raw(copy).header().incompatible & kIncompatDirty) == 0);
  }
}

TEST_CASE("damage beyond the end of the file: same verdict as qemu-img, no crash") {
  if (!QemuAvailable()) return;
  struct Case {
    const char* name;
    std::function<void(Raw&)> damage;
  };
  const std::vector<Case> cases = {
      {"L2 entry far past the end", [](Raw& r) { r.SetL2(2, (1ull << 54) | kFlagCopied); }},
      {"L2 entry misaligned", [](Raw& r) { r.SetL2(2, (r.L2(2) + 512)); }},
      {"L2 entry with reserved bits", [](Raw& r) { r.SetL2(2, r.L2(2) | 2); }},
      {"L1 entry far past the end", [](Raw& r) { r.Set64(r.header().l1_offset, (1ull << 50) | kFlagCopied); }},
      {"compressed entry with COPIED",
       [](Raw& r) { r.SetL2(2, EncodeCompressed(r.HostCluster(2) * kCs, 100, 16) | kFlagCopied); }},
      {"refcount block past the end", [](Raw& r) { r.Set64(r.header().reftable_offset, 1ull << 40); }},
      {"refcount block misaligned", [](Raw& r) { r.Set64(r.header().reftable_offset, r.Get64(r.header().reftable_offset) + 512); }},
      {"refcount table entry with reserved bits", [](Raw& r) { r.Set64(r.header().reftable_offset, r.Get64(r.header().reftable_offset) | 1); }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    TempDir dir;
    const std::string img = dir / "hostile.qcow2";
    MakeImage(img);
    {
      Raw raw(img);
      c.damage(raw);
    }
    const CheckReport r = Ours(img);
    const QemuCheck q = Qemu(img);
    INFO("ours:\n" << Messages(r) << "qemu-img:\n" << q.err);
    CHECK(CheckExitCode(r) == q.exit_code);
    CHECK(CheckExitCode(r) != 0);
    // Repair: whatever qemu-img makes of the same damage, we end no worse.
    const std::string copy = dir / "copy.qcow2";
    Copy(img, copy);
    const QemuCheck qr = Qemu(copy, "all");
    auto ours = CheckImage(img, CheckOptions{.repair = RepairMode::kAll});
    REQUIRE(ours.ok());
    INFO("ours -r all:\n" << Messages(*ours) << "qemu-img -r all:\n" << qr.err);
    if (qr.exit_code == 0) CHECK(CheckExitCode(*ours) == 0);
    CHECK(CheckExitCode(*ours) == Qemu(img).exit_code);
  }
}

namespace {

// A file that fails every read after the first n (fault injection).
class FailingFile : public File {
 public:
  FailingFile(std::unique_ptr<File> f, int reads) : f_(std::move(f)), left_(reads) {}
  Status ReadAt(uint64_t o, std::span<uint8_t> b) override {
    if (left_-- <= 0) return Status::IOError("injected read failure");
    return f_->ReadAt(o, b);
  }
  Status WriteAt(uint64_t o, std::span<const uint8_t> d) override { return f_->WriteAt(o, d); }
  Status Sync() override { return f_->Sync(); }
  Result<uint64_t> Size() override { return f_->Size(); }
  Status Truncate(uint64_t s) override { return f_->Truncate(s); }
  Status Lock(LockMode m) override { return f_->Lock(m); }
  const std::string& name() const override { return f_->name(); }

 private:
  std::unique_ptr<File> f_;
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
  if (!testing::HaveCommand("qemu-io")) return;
  TempDir dir;
  const std::string img = dir / "locked.qcow2";
  MakeImage(img);
  // While qemu-io holds the image read-write, repair must refuse; a plain
  // check too (QEMU refuses to share write), unless forced.
  const std::string fifo = dir / "fifo";
  REQUIRE(Run("mkfifo " + Sh(fifo)).exit_code == 0);
  std::thread holder([&] { Run("qemu-io " + Sh(img) + " < " + Sh(fifo)); });
  std::ofstream keep(fifo);  // qemu-io runs until this closes
  Result<CheckReport> repair = Status::IOError("not tried");
  for (int i = 0; i < 500; ++i) {
    repair = CheckImage(img, CheckOptions{.repair = RepairMode::kAll});
    if (!repair.ok() && repair.status().kind() == ErrorKind::kBusy) break;
    usleep(10000);
  }
  CHECK_FALSE(repair.ok());
  if (!repair.ok()) CHECK(repair.status().kind() == ErrorKind::kBusy);
  auto plain = CheckImage(img, CheckOptions{});
  CHECK_FALSE(plain.ok());
  auto forced = CheckImage(img, CheckOptions{.force_share = true});
  CHECK(forced.ok());
  keep << "quit\n";
  keep.close();
  holder.join();
}
