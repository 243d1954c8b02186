// Real crashes: SIGKILL the qcow2dedup binary at random (seeded) moments of
// a `convert` and of a `write`, then repair (our `check -r all` and
// `qemu-img check -r all` by turns), and judge with qemu-img: the image is
// clean, every guest cluster holds its old or its new content, and a
// further `write` into the repaired image works and gives the right data.
//
// Both run with --flush-interval, so that data and tables reach the disk
// all through the run, not only at its end: without it the tables stay in
// the cache until Close (a 64 MiB run never fills it), and a kill could
// only leave all of the old data or, while closing, all of the new. A good
// share of the kills must leave part of the new data (some clusters new,
// some old): that is what proves old-or-new per cluster.
//
// Half the kills come once a run has written a given share of what a whole
// run writes, so they land mid-run however fast the machine is at that
// moment; the others come at times. Each case goes on (up to four times
// its kills) until it has its kills and a quarter of them left part of the
// new data. The seed is printed; QCOW2DEDUP_KILL_SEED=N reruns the same
// kill points (the timed ones still depend on the machine's speed).
#include <doctest/doctest.h>

#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <random>
#include <thread>

#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using testing::BackgroundProcess;
using testing::Run;
using testing::RunResult;
using testing::Sh;
using testing::TempDir;
using testing::Tool;
namespace fs = std::filesystem;

namespace {

using Bytes = std::string;

uint64_t Seed() {
  const char* s = std::getenv("QCOW2DEDUP_KILL_SEED");
  return s && *s ? std::strtoull(s, nullptr, 0) : 20240611;
}

struct SplitMix {
  uint64_t x;
  uint64_t Next() {
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  void Fill(char* p, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
      uint64_t v = Next();
      std::memcpy(p + i, &v, std::min<size_t>(8, n - i));
    }
  }
};

// Content that dedups at 4K and at 64K: 64K segments that are unique random
// data, copies from a pool of 64K blocks, mixes of pooled and random 4K
// blocks, or zeros.
Bytes MakeContent(uint64_t size, uint64_t seed) {
  SplitMix rng{seed};
  Bytes pool64(16 * 65536, '\0'), pool4(64 * 4096, '\0');
  rng.Fill(pool64.data(), pool64.size());
  rng.Fill(pool4.data(), pool4.size());
  Bytes d(size, '\0');
  for (uint64_t seg = 0; seg < size; seg += 65536) {
    const uint64_t kind = rng.Next() % 10;
    char* p = &d[seg];
    if (kind < 3) {
      rng.Fill(p, 65536);
    } else if (kind < 6) {
      std::memcpy(p, &pool64[(rng.Next() % 16) * 65536], 65536);
    } else if (kind < 8) {
      for (uint64_t c = 0; c < 65536; c += 4096) {
        if (rng.Next() % 3) std::memcpy(p + c, &pool4[(rng.Next() % 64) * 4096], 4096);
        else rng.Fill(p + c, 4096);
      }
    }  // else zeros
  }
  return d;
}

Bytes Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  Bytes b(size_t(std::max<std::streamoff>(0, f.tellg())), '\0');
  f.seekg(0);
  f.read(b.data(), std::streamsize(b.size()));
  return b;
}

void Spit(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(b.data(), std::streamsize(b.size()));
  REQUIRE(f.good());
}

bool HasQcow2Magic(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char m[4] = {};
  f.read(m, 4);
  return f.gcount() == 4 && std::memcmp(m, "QFI\xfb", 4) == 0;
}

// qemu-img's view of an image's guest data.
Bytes QemuView(const std::string& img, const std::string& scratch) {
  fs::remove(scratch);
  RunResult r = Run("qemu-img convert -f qcow2 -O raw " + Sh(img) + " " + Sh(scratch));
  INFO("qemu-img convert " << img << ": " << r.err);
  REQUIRE(r.exit_code == 0);
  Bytes b = Slurp(scratch);
  fs::remove(scratch);
  return b;
}

// Every cluster of got equals the same cluster of old or of new_; the
// number of clusters that hold the new content where it differs.
uint64_t CheckOldOrNew(const Bytes& got, const Bytes& old, const Bytes& new_, uint64_t cs, const std::string& what) {
  REQUIRE_MESSAGE(got.size() == new_.size(), what, ": qemu-img sees ", got.size(), " bytes, expected ", new_.size());
  uint64_t bad = 0, first_bad = 0, became_new = 0;
  for (uint64_t off = 0; off < got.size(); off += cs) {
    const uint64_t n = std::min<uint64_t>(cs, got.size() - off);
    const bool is_old = std::memcmp(&got[off], &old[off], n) == 0;
    const bool is_new = std::memcmp(&got[off], &new_[off], n) == 0;
    if (!is_old && !is_new && bad++ == 0) first_bad = off / cs;
    if (is_new && !is_old) ++became_new;
  }
  CHECK_MESSAGE(bad == 0, what, ": ", bad, " clusters hold neither old nor new content (first: guest cluster ",
                first_bad, ")");
  return became_new;
}

// What a kill may leave in a version 2 image, which no dirty bit makes
// anyone repair before QEMU writes into it again: leaks (a refcount above
// the references) and COPIED flags out of date only where that is harmless.
// Never a refcount below the references, and never COPIED on a cluster two
// entries use (QEMU would write into it in place, under the other one).
void CheckV2CrashSafe(const std::string& img, const std::string& what) {
  RunResult r = Run("qemu-img check " + Sh(img));
  std::istringstream err(r.err);
  for (std::string line; std::getline(err, line);)
    CHECK_MESSAGE((line.rfind("Leaked cluster", 0) == 0 || line.rfind("ERROR OFLAG_COPIED data cluster", 0) == 0),
                  what, ": qemu-img check before any repair: ", line);
  const uint64_t unsafe = testing::UnsafeCopiedEntries(img);
  CHECK_MESSAGE(unsafe == 0, what, ": ", unsafe, " L2 entries carry COPIED on a cluster other entries use too");
}

struct Outcome {
  bool killed = false;
  bool no_image = false;  // killed before the header was on disk
};

// How far along a run is: the bytes it has written so far (wchar in
// /proc/PID/io: data, tables, the header; not hole punches). That grows
// with the work whatever the machine's speed, unlike a time (CI runs this
// test beside others, and alone), and unlike the file's length (a write
// reuses the clusters it frees).
uint64_t BytesWritten(pid_t pid) {
  std::ifstream io("/proc/" + std::to_string(pid) + "/io");
  for (std::string key; io >> key;) {
    uint64_t v = 0;
    io >> v;
    if (key == "wchar:") return v;
  }
  return 0;
}

// A whole run: how long it took and how much it wrote.
struct WholeRun {
  double seconds = 0;
  uint64_t written = 0;
};

// When to kill a run: after a time, or once it has written a share of
// what a whole run writes (share < 0: by time only).
struct KillPoint {
  double delay = 0;
  double share = -1;
  std::string Describe(double full) const {
    return share >= 0 ? "after writing " + std::to_string(share) + " of what a whole run writes"
                      : "after " + std::to_string(delay) + " s of " + std::to_string(full);
  }
};

// Half the kills land at a share of the work, so that they leave part of
// the new data; a quarter anywhere in time (from the first instant, before
// the header exists); a quarter near the end, where Close flushes the last
// tables, stores the dedup index and writes the header.
KillPoint PickKill(const WholeRun& full, std::mt19937_64& rng) {
  KillPoint k;
  switch (rng() % 4) {
    case 0:
    case 1: k.share = std::uniform_real_distribution<double>(0.1, 0.9)(rng); break;
    case 2: k.delay = std::uniform_real_distribution<double>(0.0, full.seconds)(rng); break;
    default: k.delay = std::uniform_real_distribution<double>(0.75 * full.seconds, 1.05 * full.seconds)(rng); break;
  }
  return k;
}

// Starts cmd, kills it with SIGKILL at point k if it still runs.
Outcome RunAndKill(const std::string& cmd, const KillPoint& k, const WholeRun& full) {
  Outcome o;
  // exec: the process killed and reaped is qcow2dedup itself, not a shell.
  BackgroundProcess p("exec " + cmd + " >/dev/null 2>&1");
  const auto t0 = std::chrono::steady_clock::now();
  auto due = [&] {
    if (k.share >= 0) return double(BytesWritten(p.pid())) >= k.share * double(full.written);
    return std::chrono::steady_clock::now() - t0 >= std::chrono::duration<double>(k.delay);
  };
  while (!due() && p.Running()) std::this_thread::sleep_for(std::chrono::microseconds(500));
  if (p.Running()) {
    p.Kill();
    o.killed = true;
    // Nothing of the group may be left (holding the image's locks).
    CHECK(testing::WaitFor([&] { return ::kill(-p.pid(), 0) != 0; }, 10));
  } else {
    CHECK_MESSAGE(p.Wait(0) == 0, "`", cmd, "` finished before its kill but failed");
  }
  return o;
}

// Runs cmd whole (it must succeed), sampling what it writes as it goes.
WholeRun TimeRun(const std::string& cmd, const TempDir& dir) {
  const std::string log = dir / "run.log";
  const auto t0 = std::chrono::steady_clock::now();
  BackgroundProcess p("exec " + cmd + " >" + Sh(log) + " 2>&1");
  WholeRun w;
  do {
    w.written = std::max(w.written, BytesWritten(p.pid()));  // before the reaping, which ends /proc/PID
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  } while (p.Running());
  w.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int rc = p.Wait(0);
  INFO(cmd << "\n" << Slurp(log));
  REQUIRE(rc == 0);
  REQUIRE_MESSAGE(w.written > 0, "no bytes written seen in /proc/", p.pid(), "/io");
  return w;
}

// The faster of two whole runs (the first reads its input cold).
WholeRun Faster(const WholeRun& a, const WholeRun& b) { return a.seconds <= b.seconds ? a : b; }

// Repairs img with ours (even i) or qemu-img (odd i), then qemu-img must
// find it clean.
void Repair(const std::string& img, int i, const std::string& compat = "1.1") {
  const std::string repairer = i % 2 == 0 ? Tool() : std::string("qemu-img");
  RunResult r = Run(repairer + " check -r all " + Sh(img));
  INFO(repairer << " check -r all " << img << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 0);
  testing::CheckQemuClean(img, compat);
  // And our own check agrees, whoever repaired.
  RunResult ours = Run(Tool() + " check " + Sh(img));
  CHECK_MESSAGE(ours.exit_code == 0, "qcow2dedup check after the repair: ", ours.out, ours.err);
}

// A further write into the repaired image: new data and a copy of data
// already stored, over clusters that may be shared; judged with qemu-img.
void WriteAfterRepair(const std::string& img, const Bytes& before, uint64_t cs, SplitMix& rng, const TempDir& dir,
                      const std::string& compat = "1.1") {
  const uint64_t size = before.size();
  Bytes patch(4 * cs, '\0');
  rng.Fill(patch.data(), 2 * cs);
  const uint64_t src = (rng.Next() % (size / cs)) * cs;
  std::memcpy(&patch[2 * cs], &before[src], 2 * cs <= size - src ? 2 * cs : size - src);
  const uint64_t at = (rng.Next() % (size / cs - 8)) * cs + cs / 2;  // not cluster aligned
  Spit(dir / "patch.bin", patch);
  RunResult r = Run(Tool() + " write --input " + Sh(dir / "patch.bin") + " " + Sh(img) + " " + std::to_string(at));
  INFO("write into the repaired image: " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  Bytes expect = before;
  expect.replace(at, patch.size(), patch);
  Spit(dir / "expect.raw", expect);
  testing::CheckQemuIdentical(img, dir / "expect.raw");
  testing::CheckQemuClean(img, compat);
  fs::remove(dir / "expect.raw");
}

// Every this many bytes of input the runs flush: several flush points per run.
constexpr const char* kFlushInterval = "4M";

struct Tally {
  int kills = 0, finished = 0, no_image = 0;
  int partly_new = 0;  // kills after which some but not all changed clusters held new data
  int all_new = 0;     // kills after the new tables were on disk (while closing)
};

// At least a quarter of the kills must have landed mid-run, leaving some
// but not all of the new data: otherwise old-or-new per cluster was not
// really put to the test.
void CheckPartlyNew(const Tally& t) {
  CHECK_MESSAGE(t.partly_new * 4 >= t.kills, "only ", t.partly_new, " of ", t.kills,
                " kills left part of the new data (at least a quarter must)");
}

// Whether a run of kills has yet to reach its goal: kills runs killed, a
// quarter of them mid-run (the checks above; the loops stop at 4 * kills
// tries all the same).
bool Wanting(const Tally& t, int kills) { return t.kills < kills || t.partly_new * 4 < t.kills; }

// (a) Kills during `convert` of a raw file into a new image.
Tally KillConvert(uint64_t cs, uint64_t size, int kills, uint64_t seed) {
  TempDir dir;
  const std::string src = dir / "src.raw", img = dir / "img.qcow2";
  const Bytes content = MakeContent(size, seed);
  Spit(src, content);
  const Bytes zeros(size, '\0');
  const std::string cmd =
      Tool() + " convert --flush-interval " + kFlushInterval + " -f raw -o cluster_size=" + std::to_string(cs) + " " +
      Sh(src) + " " + Sh(img);
  // Whole runs: that a convert is right, and how long it takes (the faster
  // of two: the first reads the source cold).
  const WholeRun first = TimeRun(cmd, dir);
  testing::CheckQemuIdentical(img, src);
  fs::remove(img);
  const WholeRun full = Faster(first, TimeRun(cmd, dir));
  SplitMix rng{seed ^ 0xabcdef};
  std::mt19937_64 times(seed);
  Tally t;
  for (int i = 0; Wanting(t, kills) && i < 4 * kills; ++i) {
    fs::remove(img);
    const KillPoint k = PickKill(full, times);
    const std::string what = "convert (cluster size " + std::to_string(cs) + ") killed " + k.Describe(full.seconds) +
                             " (iteration " + std::to_string(i) + ")";
    INFO(what);
    Outcome o = RunAndKill(cmd, k, full);
    o.killed ? ++t.kills : ++t.finished;
    if (!o.killed) {
      testing::CheckQemuClean(img);
      testing::CheckQemuIdentical(img, src);
      continue;
    }
    if (!fs::exists(img) || !HasQcow2Magic(img)) {
      // Killed before the header was written: the file must be no image
      // at all (nothing that could pass for a finished convert).
      ++t.no_image;
      if (fs::exists(img))
        CHECK_MESSAGE(Run("qemu-img info -f qcow2 " + Sh(img)).exit_code != 0,
                      "a file without a qcow2 header opens as qcow2");
      continue;
    }
    Repair(img, i);
    const Bytes got = QemuView(img, dir / "view.raw");
    const uint64_t became_new = CheckOldOrNew(got, zeros, content, cs, what);
    if (became_new > 0 && got != content) ++t.partly_new;
    if (got == content) ++t.all_new;
    WriteAfterRepair(img, got, cs, rng, dir);
  }
  CHECK_MESSAGE(t.kills >= kills / 2, "too few runs were still going when killed: ", t.kills, " of ", kills);
  CheckPartlyNew(t);
  return t;
}

// (b) Kills during `write --input big.bin IMAGE OFF` into a dedup image
// holding old data; the input overwrites shared clusters.
// v2: the image is a version 2 one that qemu-img wrote (no dirty bit: a
// kill must leave what CheckV2CrashSafe accepts, and the guest view before
// any repair must already be old or new).
Tally KillWrite(uint64_t cs, uint64_t size, int kills, uint64_t seed, bool v2 = false) {
  const std::string compat = v2 ? "0.10" : "1.1";
  TempDir dir;
  const std::string old_raw = dir / "old.raw", base = dir / "base.qcow2", img = dir / "img.qcow2",
                    input = dir / "big.bin";
  const Bytes old = MakeContent(size, seed);
  Spit(old_raw, old);
  RunResult conv = Run((v2 ? "qemu-img convert -O qcow2 -o compat=0.10," : Tool() + " convert -o ") + "cluster_size=" +
                       std::to_string(cs) + " -f raw " + Sh(old_raw) + " " + Sh(base));
  REQUIRE_MESSAGE(conv.exit_code == 0, conv.err);
  // The input: fresh content mixed with copies of old clusters (so that
  // writes share clusters already stored) and zeros, over the middle of the
  // disk, starting and ending inside a cluster.
  const uint64_t off = size / 8 + cs / 2, len = size * 3 / 4;
  Bytes in = MakeContent(len, seed * 7 + 1);
  SplitMix rng{seed ^ 0x5555};
  for (uint64_t c = 0; c + cs <= len; c += cs)
    if (rng.Next() % 4 == 0) {
      const uint64_t from = (rng.Next() % (size / cs)) * cs;
      std::memcpy(&in[c], &old[from], cs);
    }
  Spit(input, in);
  Bytes fresh = old;
  fresh.replace(off, len, in);
  const std::string cmd = Tool() + " write --flush-interval " + kFlushInterval + " --input " + Sh(input) + " " +
                          Sh(img) + " " + std::to_string(off);
  fs::copy_file(base, img, fs::copy_options::overwrite_existing);
  const WholeRun first = TimeRun(cmd, dir);
  fs::copy_file(base, img, fs::copy_options::overwrite_existing);
  const WholeRun full = Faster(first, TimeRun(cmd, dir));
  {
    Spit(dir / "fresh.raw", fresh);
    testing::CheckQemuIdentical(img, dir / "fresh.raw");
    fs::remove(dir / "fresh.raw");
  }
  std::mt19937_64 times(seed);
  Tally t;
  for (int i = 0; Wanting(t, kills) && i < 4 * kills; ++i) {
    fs::copy_file(base, img, fs::copy_options::overwrite_existing);
    const KillPoint k = PickKill(full, times);
    const std::string what = std::string(v2 ? "v2 " : "") + "write (cluster size " + std::to_string(cs) +
                             ") killed " + k.Describe(full.seconds) + " (iteration " + std::to_string(i) + ")";
    INFO(what);
    Outcome o = RunAndKill(cmd, k, full);
    o.killed ? ++t.kills : ++t.finished;
    if (v2) {
      CheckV2CrashSafe(img, what);
      CheckOldOrNew(QemuView(img, dir / "view.raw"), old, fresh, cs, what + ", before any repair");
    }
    Repair(img, i, compat);
    const Bytes got = QemuView(img, dir / "view.raw");
    if (!o.killed) CHECK_MESSAGE(got == fresh, what, ": a write that finished left other data");
    const uint64_t became_new = CheckOldOrNew(got, old, fresh, cs, what);
    if (o.killed && became_new > 0 && got != fresh) ++t.partly_new;
    if (o.killed && got == fresh) ++t.all_new;
    WriteAfterRepair(img, got, cs, rng, dir, compat);
  }
  CHECK_MESSAGE(t.kills >= kills / 2, "too few runs were still going when killed: ", t.kills, " of ", kills);
  CheckPartlyNew(t);
  return t;
}

// Distinct host clusters holding the guest's data, as qemu-img map shows them.
uint64_t StoredClusters(const std::string& img, uint64_t cs) {
  RunResult r = Run("qemu-img map --output=json " + Sh(img));
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  std::set<uint64_t> hosts;
  for (const auto& e : nlohmann::json::parse(r.out))
    if (e["data"] == true && e.contains("offset"))
      for (uint64_t o = 0; o < e["length"].get<uint64_t>(); o += cs) hosts.insert(e["offset"].get<uint64_t>() + o);
  return hosts.size();
}

// (c) Kills during `dedup` of an image qemu-img wrote (duplicates stored
// apart, zeros stored): the guest view never changes. The
// relinking flushes every 4M of guest space (--flush-interval), so a kill
// lands between flushes.
Tally KillDedup(uint64_t size, int kills, uint64_t seed, bool v2) {
  const uint64_t cs = 4096;
  const std::string compat = v2 ? "0.10" : "1.1";
  TempDir dir;
  const std::string raw = dir / "content.raw", base = dir / "base.qcow2", img = dir / "img.qcow2";
  const Bytes content = MakeContent(size, seed);
  Spit(raw, content);
  RunResult conv = Run("qemu-img convert -f raw -O qcow2 -o cluster_size=4096" + std::string(v2 ? ",compat=0.10 " : " ") +
                       Sh(raw) + " " + Sh(base));
  REQUIRE_MESSAGE(conv.exit_code == 0, conv.err);
  const std::string cmd = Tool() + " dedup -q --flush-interval " + kFlushInterval + " " + Sh(img);
  fs::copy_file(base, img, fs::copy_options::overwrite_existing);
  const uint64_t stored_before = StoredClusters(img, cs);
  const WholeRun first = TimeRun(cmd, dir);
  testing::CheckQemuIdentical(img, raw);
  testing::CheckQemuClean(img, compat);
  const uint64_t stored_after = StoredClusters(img, cs);
  REQUIRE(stored_after < stored_before);
  fs::copy_file(base, img, fs::copy_options::overwrite_existing);
  const WholeRun full = Faster(first, TimeRun(cmd, dir));
  std::mt19937_64 times(seed);
  SplitMix rng{seed ^ 0x7777};
  Tally t;
  for (int i = 0; Wanting(t, kills) && i < 4 * kills; ++i) {
    fs::copy_file(base, img, fs::copy_options::overwrite_existing);
    const KillPoint k = PickKill(full, times);
    const std::string what = std::string(v2 ? "v2 " : "") + "dedup killed " + k.Describe(full.seconds) + " (iteration " +
                             std::to_string(i) + ")";
    INFO(what);
    Outcome o = RunAndKill(cmd, k, full);
    o.killed ? ++t.kills : ++t.finished;
    if (v2) {
      CheckV2CrashSafe(img, what);
      CHECK_MESSAGE(QemuView(img, dir / "view.raw") == content, what, ": the guest view changed before any repair");
    }
    Repair(img, i, compat);
    const Bytes got = QemuView(img, dir / "view.raw");
    CHECK_MESSAGE(got == content, what, ": the guest view changed");
    // Part of the duplicates gone, not all: the kill landed mid-relinking.
    const uint64_t now = StoredClusters(img, cs);
    if (o.killed && now < stored_before && now > stored_after) ++t.partly_new;
    if (o.killed && now == stored_after) ++t.all_new;
    WriteAfterRepair(img, got, cs, rng, dir, compat);
  }
  CHECK_MESSAGE(t.kills >= kills / 2, "too few runs were still going when killed: ", t.kills, " of ", kills);
  CheckPartlyNew(t);
  return t;
}

void Report(const std::string& what, const Tally& t, uint64_t seed) {
  const std::string line = what + ": " + std::to_string(t.kills) + " kills (" + std::to_string(t.no_image) +
                           " before the header existed, " + std::to_string(t.partly_new) +
                           " leaving part of the new data, " + std::to_string(t.all_new) + " all of it), " + std::to_string(t.finished) +
                           " runs finished first; seed " + std::to_string(seed);
  MESSAGE(line);
  std::cout << line << "\n";
}

}  // namespace

TEST_CASE("SIGKILL during convert: repairable, every cluster zero or the source") {
  REQUIRE(testing::HaveCommand("qemu-img"));
  const uint64_t seed = Seed();
  Report("convert, 4K clusters", KillConvert(4096, 64ull << 20, 10, seed), seed);
  Report("convert, 64K clusters", KillConvert(65536, 96ull << 20, 10, seed + 1), seed + 1);
}

TEST_CASE("SIGKILL during write: repairable, every cluster old or new") {
  REQUIRE(testing::HaveCommand("qemu-img"));
  const uint64_t seed = Seed();
  Report("write, 4K clusters", KillWrite(4096, 64ull << 20, 10, seed + 2), seed + 2);
  Report("write, 64K clusters", KillWrite(65536, 64ull << 20, 10, seed + 3), seed + 3);
}

TEST_CASE("SIGKILL during write into a version 2 image: at most leaks, old or new even before repair") {
  REQUIRE(testing::HaveCommand("qemu-img"));
  const uint64_t seed = Seed();
  Report("v2 write, 4K clusters", KillWrite(4096, 64ull << 20, 10, seed + 4, true), seed + 4);
  Report("v2 write, 64K clusters", KillWrite(65536, 64ull << 20, 10, seed + 5, true), seed + 5);
}

TEST_CASE("SIGKILL during dedup: repairable, the guest view never changes") {
  REQUIRE(testing::HaveCommand("qemu-img"));
  const uint64_t seed = Seed();
  Report("dedup", KillDedup(64ull << 20, 10, seed + 6, false), seed + 6);
  Report("v2 dedup", KillDedup(64ull << 20, 10, seed + 7, true), seed + 7);
}
