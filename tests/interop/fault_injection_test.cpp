// Fault injection at every write and sync point of a `write` run and of a
// `convert` run, leveldb-style: fail the n-th write or sync (EIO, ENOSPC),
// or cut the power there (dropping unsynced writes, all or some). Then the
// image must open, `check -r all` must reach clean (and so must qemu-img),
// and every guest cluster must hold its old or its new data.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <sstream>

#include "qcow2dedup/check.h"
#include "qcow2dedup/convert.h"
#include "qcow2dedup/dedup.h"
#include "qcow2dedup/image.h"
#include "support/fault_file.h"
#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::FaultFile;
using testing::FaultKind;

namespace {

constexpr uint64_t kCluster = 4096;
constexpr uint64_t kSize = 64 * kCluster;

using Bytes = std::vector<uint8_t>;

Bytes Pattern(uint64_t len, uint32_t seed) {
  Bytes b(len);
  std::mt19937 rng(seed);
  for (auto& x : b) x = uint8_t(rng());
  return b;
}

// One step of a run: bytes at a guest offset. Steps touch disjoint clusters,
// so "old or new" is well defined for each cluster.
struct Step {
  uint64_t offset;
  Bytes data;
};

// The old content: some unique clusters, some duplicates, some zeros.
Bytes OldContent() {
  Bytes d(kSize, 0);
  Bytes a = Pattern(kCluster, 1), b = Pattern(kCluster, 2);
  for (uint64_t c = 0; c < 40; ++c) {
    const Bytes& src = c % 3 == 0 ? a : c % 3 == 1 ? b : Pattern(kCluster, uint32_t(100 + c));
    std::memcpy(&d[c * kCluster], src.data(), kCluster);
  }
  return d;
}

std::vector<Step> WriteSteps() {
  std::vector<Step> s;
  s.push_back({0 * kCluster, Pattern(3 * kCluster, 7)});            // new data over shared clusters
  s.push_back({4 * kCluster, Pattern(kCluster, 2)});                // a copy of data already stored
  s.push_back({6 * kCluster, Bytes(2 * kCluster, 0)});              // zeros over data
  s.push_back({10 * kCluster + 100, Pattern(kCluster - 200, 9)});   // inside one cluster
  s.push_back({12 * kCluster, Pattern(5 * kCluster, 7)});           // repeats the first step's data
  s.push_back({45 * kCluster, Pattern(4 * kCluster, 11)});          // into empty space
  s.push_back({50 * kCluster, Pattern(kCluster, 1)});               // another shared copy
  return s;
}

Bytes Apply(Bytes d, const std::vector<Step>& steps) {
  for (const Step& st : steps) std::memcpy(&d[st.offset], st.data.data(), st.data.size());
  return d;
}

Status RunSteps(Image& img, const std::vector<Step>& steps) {
  for (const Step& st : steps) QD_RETURN_IF_ERROR(img.Write(st.offset, st.data));
  return img.Close();
}

void WriteFile(const std::string& path, const Bytes& b) {
  FILE* f = fopen(path.c_str(), "wb");
  REQUIRE(f);
  // fwrite's pointer must not be null, even for no bytes (UBSan: nonnull-attribute).
  if (!b.empty()) REQUIRE(fwrite(b.data(), 1, b.size(), f) == b.size());
  fclose(f);
}

// The base image: created, filled with the old content, closed cleanly.
void MakeBase(const std::string& path, const Bytes& old) {
  CreateOptions o;
  o.virtual_size = kSize;
  o.cluster_size = kCluster;
  auto img = Image::Create(path, o);
  REQUIRE(img.ok());
  REQUIRE((*img)->Write(0, old).ok());
  REQUIRE((*img)->Close().ok());
}

// The cluster size old-or-new is judged at (a test of smaller clusters
// sets it: a step may then land in part).
uint64_t g_judge = kCluster;

// Every guest cluster of the image holds its old or its new data.
void ExpectOldOrNew(const std::string& path, const Bytes& old_data, const Bytes& new_data, const char* when) {
  auto img = Image::Open(path, {});
  REQUIRE(img.ok());
  Bytes now(kSize);
  REQUIRE((*img)->Read(0, now).ok());
  for (uint64_t c = 0; c < kSize / g_judge; ++c) {
    const uint8_t* got = &now[c * g_judge];
    bool is_old = std::memcmp(got, &old_data[c * g_judge], g_judge) == 0;
    bool is_new = std::memcmp(got, &new_data[c * g_judge], g_judge) == 0;
    CHECK_MESSAGE((is_old || is_new), "guest cluster ", c, " holds neither its old nor its new data ", when);
  }
}

// A version 2 image, as the failure left it: nothing repairs it before
// QEMU uses it (no dirty bit), so it must already be safe: qemu-img check
// finds at most leaks and stale COPIED flags, no refcount below its
// references; and the guest reads old or new data.
void ExpectSafeWithoutRepair(const std::string& path, const Bytes& old_data, const Bytes& new_data) {
  auto q = testing::Run("qemu-img check " + testing::Sh(path));
  std::istringstream err(q.err);
  for (std::string line; std::getline(err, line);)
    CHECK_MESSAGE((line.rfind("Leaked cluster", 0) == 0 || line.rfind("ERROR OFLAG_COPIED data cluster", 0) == 0),
                  "qemu-img check before any repair: ", line);
  CHECK_MESSAGE(testing::UnsafeCopiedEntries(path) == 0, "COPIED on a cluster other entries use too");
  ExpectOldOrNew(path, old_data, new_data, "before any repair");
}

// After a failure: repair, then judge with both tools and per cluster.
void ExpectRepairsToOldOrNew(const std::string& path, const Bytes& old_data, const Bytes& new_data,
                             bool may_be_unformatted, bool v2 = false) {
  {
    auto probe = Image::Open(path, {});
    if (!probe.ok() && may_be_unformatted) {
      // Failed before the image was ever whole: it must not pass for one,
      // and the refusal must say the file is no sound image (not that it
      // could not be read, say).
      CHECK_MESSAGE(probe.status().kind() == ErrorKind::kCorruption, probe.status().message());
      CHECK(testing::Run("qemu-img check " + testing::Sh(path)).exit_code != 0);
      return;
    }
    REQUIRE_MESSAGE(probe.ok(), probe.status().message());
  }
  if (v2) ExpectSafeWithoutRepair(path, old_data, new_data);
  CheckOptions repair;
  repair.repair = RepairMode::kAll;
  auto fixed = CheckImage(path, std::move(repair));
  REQUIRE_MESSAGE(fixed.ok(), fixed.status().message());
  auto again = CheckImage(path, {});
  REQUIRE(again.ok());
  CHECK_MESSAGE(CheckExitCode(*again) == 0, "check after repair: corruptions=", again->corruptions,
                " leaks=", again->leaks);
  auto q = testing::Run("qemu-img check " + testing::Sh(path));
  CHECK_MESSAGE(q.exit_code == 0, q.out, q.err);
  ExpectOldOrNew(path, old_data, new_data, "after the repair");
  Bytes now(kSize);
  {
    auto img = Image::Open(path, {});
    REQUIRE(img.ok());
    REQUIRE((*img)->Read(0, now).ok());
  }
  // Whatever index the run and the repair left (updated in place, moved,
  // rebuilt or dropped) serves the next write: copies of stored data into
  // the last two clusters link to the right clusters, or are stored again.
  const uint64_t last = kSize / kCluster - 2;
  {
    OpenOptions o;
    o.writable = true;
    auto w = Image::Open(path, std::move(o));
    REQUIRE_MESSAGE(w.ok(), w.status().message());
    Bytes copies(now.begin(), now.begin() + kCluster);
    copies.insert(copies.end(), now.begin() + 4 * kCluster, now.begin() + 5 * kCluster);
    REQUIRE((*w)->Write(last * kCluster, copies).ok());
    REQUIRE((*w)->Close().ok());
    std::memcpy(&now[last * kCluster], copies.data(), copies.size());
  }
  auto after = Image::Open(path, {});
  REQUIRE(after.ok());
  Bytes read(kSize);
  REQUIRE((*after)->Read(0, read).ok());
  CHECK_MESSAGE(read == now, "a write after the repair left other data");
  after->reset();
  auto q2 = testing::Run("qemu-img check " + testing::Sh(path));
  CHECK_MESSAGE(q2.exit_code == 0, q2.out, q2.err);
  auto ours = CheckImage(path, {});
  REQUIRE(ours.ok());
  CHECK(CheckExitCode(*ours) == 0);
}

enum class Fault { kWriteEIO, kWriteENOSPC, kSyncEIO, kPowerCutAtWrite, kPartialPowerCut };

const char* Name(Fault f) {
  switch (f) {
    case Fault::kWriteEIO: return "write EIO";
    case Fault::kWriteENOSPC: return "write ENOSPC";
    case Fault::kSyncEIO: return "sync EIO";
    case Fault::kPowerCutAtWrite: return "power cut";
    case Fault::kPartialPowerCut: return "power cut keeping some unsynced writes";
  }
  return "?";
}

void Arm(FaultFile& f, Fault fault, uint64_t n) {
  switch (fault) {
    case Fault::kWriteEIO: f.FailWrite(n, FaultKind::kEIO); break;
    case Fault::kWriteENOSPC: f.FailWrite(n, FaultKind::kENOSPC, true); break;
    case Fault::kSyncEIO: f.FailSync(n, FaultKind::kEIO); break;
    case Fault::kPowerCutAtWrite:
    case Fault::kPartialPowerCut: f.FailWrite(n, FaultKind::kEIO, true); break;
  }
}

// After the run failed: a power cut drops (some of) what was never synced.
void MaybeCutPower(FaultFile& f, Fault fault, uint64_t n) {
  if (fault == Fault::kPowerCutAtWrite || fault == Fault::kSyncEIO) {
    REQUIRE(f.PowerCut().ok());
  } else if (fault == Fault::kPartialPowerCut) {
    std::mt19937 rng{uint32_t(n)};
    REQUIRE(f.PowerCut([&](size_t, const testing::UnsyncedOp&) { return rng() % 2 == 0; }).ok());
  }
  f.PowerOn();
  f.ClearFaults();
}

uint64_t g_fault_points = 0;

using RunFn = std::function<Status(const std::string& path, std::unique_ptr<FaultFile> file)>;

// Every fault at every write or sync point: fresh(path) lays the run's file
// down, run must fail with the injected error (the image it opened is gone
// when it returns, as if the process ended there), the power may go, and
// then the image must repair to old or new data in every cluster.
void InjectEverywhere(const std::string& path, uint64_t writes, uint64_t syncs,
                      const std::function<void(const std::string&)>& fresh, const RunFn& run, const Bytes& old_data,
                      const Bytes& new_data, bool may_be_unformatted, bool v2 = false) {
  for (Fault fault : {Fault::kWriteEIO, Fault::kWriteENOSPC, Fault::kSyncEIO, Fault::kPowerCutAtWrite,
                      Fault::kPartialPowerCut}) {
    const uint64_t points = fault == Fault::kSyncEIO ? syncs : writes;
    for (uint64_t n = 1; n <= points; ++n) {
      CAPTURE(Name(fault));
      CAPTURE(n);
      fresh(path);
      auto ff = FaultFile::Open(path);
      REQUIRE(ff.ok());
      Arm(**ff, fault, n);
      Status s = run(path, (*ff)->Share());
      REQUIRE_FALSE(s.ok());
      CHECK_MESSAGE(s.message().find("injected") != std::string::npos, s.message());
      MaybeCutPower(**ff, fault, n);
      ff->reset();
      ExpectRepairsToOldOrNew(path, old_data, new_data, may_be_unformatted, v2);
      ++g_fault_points;
    }
  }
}

}  // namespace

TEST_CASE("a write run fails or loses power at every write and sync point, and repairs to old or new") {
  testing::TempDir tmp;
  const Bytes old_data = OldContent();
  const auto steps = WriteSteps();
  const Bytes new_data = Apply(old_data, steps);
  const std::string base = tmp / "base.qcow2";
  MakeBase(base, old_data);

  // A clean run counts the points and proves the run itself is right.
  uint64_t writes = 0, syncs = 0;
  {
    std::filesystem::copy_file(base, tmp / "clean.qcow2");
    auto ff = FaultFile::Open(tmp / "clean.qcow2");
    REQUIRE(ff.ok());
    OpenOptions o;
    o.writable = true;
    o.file = (*ff)->Share();
    auto img = Image::Open(tmp / "clean.qcow2", std::move(o));
    REQUIRE(img.ok());
    REQUIRE(RunSteps(**img, steps).ok());
    writes = (*ff)->writes();
    syncs = (*ff)->syncs();
    img->reset();
    ff->reset();  // drops our image lock, so qemu-img may open it
    CHECK(testing::Run("qemu-img compare " + testing::Sh(tmp / "clean.qcow2") + " " +
                       testing::Sh([&] { WriteFile(tmp / "new.raw", new_data); return tmp / "new.raw"; }()))
              .exit_code == 0);
  }
  REQUIRE(writes > 5);
  REQUIRE(syncs > 2);

  auto copy_base = [&](const std::string& path) {
    std::filesystem::copy_file(base, path, std::filesystem::copy_options::overwrite_existing);
  };
  InjectEverywhere(tmp / "run.qcow2", writes, syncs, copy_base,
                   [&](const std::string& path, std::unique_ptr<FaultFile> file) -> Status {
                     OpenOptions o;
                     o.writable = true;
                     o.file = std::move(file);
                     auto img = Image::Open(path, std::move(o));
                     REQUIRE(img.ok());
                     return RunSteps(**img, steps);  // no Close on failure
                   },
                   old_data, new_data, false);
  MESSAGE("write run: ", writes, " write points, ", syncs, " sync points");
}

TEST_CASE("a dedup run fails or loses power at every write and sync point, and the guest view never changes") {
  REQUIRE_MESSAGE(testing::HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  for (const bool v2 : {false, true}) {
    CAPTURE(v2);
    testing::TempDir tmp;
    // An image QEMU wrote: duplicates stored apart, and zeros stored as data.
    const Bytes data = OldContent();
    WriteFile(tmp / "src.raw", data);
    const std::string base = tmp / "base.qcow2";
    // Version 2 at 512-byte clusters: 8 L2 tables, so that relinks and the
    // COPIED flags they clear lie in tables written apart.
    REQUIRE(testing::Run("qemu-img convert -f raw -O qcow2 -o " + std::string(v2 ? "cluster_size=512,compat=0.10 " : "cluster_size=4096 ") +
                         testing::Sh(tmp / "src.raw") + " " + testing::Sh(base)).exit_code == 0);
    REQUIRE(testing::Run("qemu-io -c 'write -P 0 160k 8k' " + testing::Sh(base)).exit_code == 0);
    auto run = [&](const std::string& path, std::unique_ptr<FaultFile> file) -> Status {
      DedupOptions o;
      o.file = std::move(file);
      return DeduplicateImage(path, std::move(o)).status();
    };
    uint64_t writes = 0, syncs = 0;
    {
      std::filesystem::copy_file(base, tmp / "clean.qcow2");
      auto ff = FaultFile::Open(tmp / "clean.qcow2");
      REQUIRE(ff.ok());
      auto r = DeduplicateImage(tmp / "clean.qcow2", DedupOptions{.file = (*ff)->Share()});
      REQUIRE_MESSAGE(r.ok(), r.status().message());
      CHECK(r->relinked > 10);
      CHECK(r->zeroed == (v2 ? 16 : 2));  // the 8K of zeros QEMU stored
      writes = (*ff)->writes();
      syncs = (*ff)->syncs();
      ff->reset();
      CHECK(testing::Run("qemu-img compare " + testing::Sh(tmp / "clean.qcow2") + " " + testing::Sh(tmp / "src.raw"))
                .exit_code == 0);
    }
    REQUIRE(writes > 3);
    auto copy_base = [&](const std::string& path) {
      std::filesystem::copy_file(base, path, std::filesystem::copy_options::overwrite_existing);
    };
    InjectEverywhere(tmp / "run.qcow2", writes, syncs, copy_base, run, data, data, false, v2);
    MESSAGE(std::string(v2 ? "version 2 " : ""), "dedup run: ", writes, " write points, ", syncs, " sync points");
  }
}

TEST_CASE("a write run into a version 2 image fails or loses power at every point: safe before any repair") {
  REQUIRE_MESSAGE(testing::HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  testing::TempDir tmp;
  const Bytes old_data = OldContent();
  const auto steps = WriteSteps();
  const Bytes new_data = Apply(old_data, steps);
  WriteFile(tmp / "old.raw", old_data);
  const std::string base = tmp / "base.qcow2";
  // QEMU's version 2 image: duplicates stored apart; then our write shares
  // them. 512-byte clusters: 8 L2 tables, so that a link and the COPIED
  // flag it clears can lie in different tables (written apart).
  g_judge = 512;
  REQUIRE(testing::Run("qemu-img convert -f raw -O qcow2 -o cluster_size=512,compat=0.10 " +
                       testing::Sh(tmp / "old.raw") + " " + testing::Sh(base)).exit_code == 0);
  auto run = [&](const std::string& path, std::unique_ptr<FaultFile> file) -> Status {
    OpenOptions o;
    o.writable = true;
    o.file = std::move(file);
    auto img = Image::Open(path, std::move(o));
    REQUIRE(img.ok());
    return RunSteps(**img, steps);
  };
  uint64_t writes = 0, syncs = 0;
  {
    std::filesystem::copy_file(base, tmp / "clean.qcow2");
    auto ff = FaultFile::Open(tmp / "clean.qcow2");
    REQUIRE(ff.ok());
    REQUIRE(run(tmp / "clean.qcow2", (*ff)->Share()).ok());
    writes = (*ff)->writes();
    syncs = (*ff)->syncs();
    ff->reset();
    WriteFile(tmp / "new.raw", new_data);
    CHECK(testing::Run("qemu-img compare " + testing::Sh(tmp / "clean.qcow2") + " " + testing::Sh(tmp / "new.raw"))
              .exit_code == 0);
  }
  REQUIRE(writes > 5);
  auto copy_base = [&](const std::string& path) {
    std::filesystem::copy_file(base, path, std::filesystem::copy_options::overwrite_existing);
  };
  InjectEverywhere(tmp / "run.qcow2", writes, syncs, copy_base, run, old_data, new_data, false, true);
  g_judge = kCluster;
  MESSAGE("version 2 write run: ", writes, " write points, ", syncs, " sync points");
}

TEST_CASE("a convert run fails or loses power at every write and sync point") {
  testing::TempDir tmp;
  const Bytes zeros(kSize, 0);
  const Bytes src = OldContent();
  WriteFile(tmp / "src.raw", src);

  auto run = [&](const std::string& path, std::unique_ptr<FaultFile> file) -> Status {
    auto dev = OpenBlockDevice(tmp / "src.raw", ImageFormat::kRaw);
    if (!dev.ok()) return dev.status();
    CreateOptions c;
    c.virtual_size = kSize;
    c.cluster_size = kCluster;
    c.force = true;
    OpenOptions o;
    o.file = std::move(file);
    auto img = Image::Create(path, c, std::move(o));
    if (!img.ok()) return img.status();
    QD_RETURN_IF_ERROR(CopyInto(**dev, **img));
    return (*img)->Close();
  };

  uint64_t writes = 0, syncs = 0;
  {
    WriteFile(tmp / "clean.qcow2", {});
    auto ff = FaultFile::Open(tmp / "clean.qcow2");
    REQUIRE(ff.ok());
    REQUIRE(run(tmp / "clean.qcow2", (*ff)->Share()).ok());
    writes = (*ff)->writes();
    syncs = (*ff)->syncs();
    ff->reset();
    CHECK(testing::Run("qemu-img compare " + testing::Sh(tmp / "clean.qcow2") + " " + testing::Sh(tmp / "src.raw"))
              .exit_code == 0);
  }
  REQUIRE(writes > 3);

  InjectEverywhere(tmp / "run.qcow2", writes, syncs, [](const std::string& path) { WriteFile(path, {}); }, run, zeros,
                   src, true);
  MESSAGE("convert run: ", writes, " write points, ", syncs, " sync points; ", g_fault_points,
          " fault points injected in all");
}
