// Hostile images: truncated files and malformed headers. Whatever the bytes,
// `qcow2dedup info` and `qcow2dedup convert -O raw` either succeed or fail
// with one line on stderr naming the file; they never crash, hang, eat
// unbounded memory or change the file they read.
#include <doctest/doctest.h>

#include <atomic>
#include <bit>
#include <filesystem>
#include <fstream>
#include <thread>
#include <regex>
#include <string>
#include <vector>

#include "support/check_output.h"
#include "support/process.h"
#include "support/qemu_images.h"
#include "support/sanitizers.h"
#include "support/temp_dir.h"

using namespace testing;
using namespace testing::images;

namespace {

constexpr uint64_t KiB = 1024, MiB = 1024 * 1024;
std::string N(uint64_t v) { return std::to_string(v); }

// Header field offsets (docs/interop/qcow2.rst).
constexpr uint64_t kMagic = 0, kVersion = 4, kBackingOffset = 8, kBackingSize = 16, kClusterBits = 20,
                   kSize = 24, kCryptMethod = 32, kL1Size = 36, kL1Offset = 40, kRefTableOffset = 48,
                   kRefTableClusters = 56, kNbSnapshots = 60, kSnapshotsOffset = 64, kIncompatible = 72,
                   kRefcountOrder = 96, kHeaderLength = 100;

// Memory a run may take: virtual (ulimit -v, KiB) and resident (KiB).
constexpr uint64_t kVirtualLimitKiB = 1000000;
constexpr uint64_t kMaxRssKiB = 256 * 1024;

// ulimit -v breaks sanitizer builds (their shadow memory is huge): use it
// only if the tool starts under it. An ASan build is not even probed (the
// probe would leave an ASan report behind, which .ci/test.sh counts as an
// error); it caps single allocations instead (support/sanitizers.h).
bool UlimitWorks() {
  if (testing::kAddressSanitizer) return false;
  static const bool works =
      Run("ulimit -v " + N(kVirtualLimitKiB) + " && " + Tool() + " --help >/dev/null").exit_code == 0;
  return works;
}

struct Outcome {
  std::string cmd;
  RunResult r;
  uint64_t max_rss_kib = 0;
};

// Runs the tool with its arguments under a time and memory bound; with
// measure, /usr/bin/time reports the peak resident memory too (the loops
// over thousands of cuts leave it out to stay fast).
Outcome RunBounded(const std::string& args, bool measure = true) {
  std::string cmd;
  if (UlimitWorks()) cmd = "ulimit -v " + N(kVirtualLimitKiB) + " && ";
  else if (testing::kAddressSanitizer) cmd = testing::MemoryLimitPrefix(kVirtualLimitKiB);
  if (!measure) {
    cmd += "exec timeout 10 " + Tool() + " " + args;
    return Outcome{cmd, Run(cmd), 0};
  }
  TempDir t;
  const std::string rss = t / "rss";
  cmd += "/usr/bin/time -f 'maxrss %M' -o " + Sh(rss) + " timeout 10 " + Tool() + " " + args;
  Outcome o{cmd, Run(cmd), 0};
  for (const std::string& line : Lines(ReadBytes(rss)))
    if (line.rfind("maxrss ", 0) == 0) o.max_rss_kib = std::stoull(line.substr(7));
  return o;
}

#define OUTCOME_INFO(o)                  \
  INFO("command: ", (o).cmd);            \
  INFO("exit code: ", (o).r.exit_code);  \
  INFO("stdout: ", (o).r.out.substr(0, 2000)); \
  INFO("stderr: ", (o).r.err);           \
  INFO("max RSS KiB: ", (o).max_rss_kib)

// Success, or a clean failure: an exit code below 128 (not a signal, not
// timeout's 124) and one stderr line naming one of names.
void CheckSucceedsOrFailsCleanly(const Outcome& o, const std::vector<std::string>& names) {
  OUTCOME_INFO(o);
  CHECK(o.r.exit_code != 124);  // timeout: a hang
  CHECK(o.r.exit_code < 124);   // >= 128: killed by a signal
  CHECK(o.max_rss_kib <= kMaxRssKiB);
  if (o.r.exit_code != 0 && o.r.exit_code < 124) {
    CHECK(IsOneErrorLine(o.r.err));
    bool named = false;
    for (const auto& n : names) named = named || o.r.err.rfind("qcow2dedup: " + n + ":", 0) == 0;
    CHECK_MESSAGE(named, "the error line does not start with qcow2dedup: <file>:");
  }
}

// check's output against qemu-img check's on the same file, for the qcow2
// part (support/check_output.h): stdout, stderr and exit code each. The
// file is taken as qemu-img takes it (one that is not qcow2 has no checks);
// these images have no backing file.
void SameCheckAsQemu(const std::string& img) {
  REQUIRE_MESSAGE(testing::HaveCommand("qemu-img"), "qemu-img is the judge");
  const RunResult q = Run("timeout 20 qemu-img check " + Sh(img));
  const Outcome o = RunBounded("check " + Sh(img), false);
  OUTCOME_INFO(o);
  INFO("qemu-img check exit " << q.exit_code << "\nstdout: " << q.out << "\nstderr: " << q.err.substr(0, 2000));
  const QcowPart ours = QcowPartOf(o.r.out, o.r.err, false), theirs = QcowPartOf(q.out, q.err, false);
  CHECK_MESSAGE(ours.out == theirs.out, "check's stdout is not qemu-img check's");
  CHECK_MESSAGE(ours.err == theirs.err, "check's stderr is not qemu-img check's");
  CHECK(o.r.exit_code == ExpectedCheckExit(q.exit_code, ours));
}

void CheckFailsCleanly(const Outcome& o, const std::vector<std::string>& names) {
  OUTCOME_INFO(o);
  CHECK(o.r.exit_code != 0);
  CheckSucceedsOrFailsCleanly(o, names);
}

std::string ReadHeader(const std::string& path) { return ReadBytes(path).substr(0, 4096); }

// A small image with data in it, for cutting and patching: qcow2dedup's own
// (created, then written by QEMU) or stock qemu-img's.
std::string MakeImage(const TempDir& dir, const std::string& name, bool ours, uint64_t cluster_size) {
  const std::string img = dir / name;
  if (ours) {
    MustRun(Tool() + " create -q -o cluster_size=" + N(cluster_size) + " " + Sh(img) + " 1M");
  } else {
    MustRun("qemu-img create -q -f qcow2 -o cluster_size=" + N(cluster_size) + " " + Sh(img) + " 1M");
  }
  QemuIo(img, {"write -q -P 0x11 0 4k", "write -q -P 0x22 " + N(300 * KiB) + " 3000",
               "write -q -P 0x11 " + N(512 * KiB) + " 4k", "write -q -z " + N(700 * KiB) + " 8k",
               "write -q -P 0x33 " + N(1 * MiB - 512) + " 512"});
  return img;
}


// One cut of an image and what the tool made of it.
struct CutResult {
  size_t length = 0;
  std::string path;  // the cut file the tool read
  std::vector<Outcome> outcomes;
  bool unchanged = true;
};

// Cuts original at every length (each worker thread has its own file) and
// runs the tool with each of commands ("%s" stands for the cut file, "%o"
// for an output file). Only the main thread asserts.
std::vector<CutResult> RunCuts(const TempDir& dir, const std::string& original, const std::vector<size_t>& lengths,
                               const std::vector<std::string>& commands) {
  std::vector<CutResult> results(lengths.size());
  std::atomic<size_t> next{0};
  std::atomic<int> crashes{0};
  auto worker = [&](int id) {
    const std::string cut = dir / ("cut" + N(uint64_t(id)) + ".qcow2");
    const std::string out = dir / ("out" + N(uint64_t(id)) + ".raw");
    for (size_t i; (i = next++) < lengths.size() && crashes < 20;) {
      CutResult& r = results[i];
      r.length = lengths[i];
      r.path = cut;
      const std::string bytes = original.substr(0, lengths[i]);
      {
        std::ofstream f(cut, std::ios::binary | std::ios::trunc);
        f.write(bytes.data(), std::streamsize(bytes.size()));
      }
      for (std::string c : commands) {
        std::filesystem::remove(out);
        for (auto [key, value] : {std::pair<std::string, std::string>{"%s", Sh(cut)}, {"%o", Sh(out)}})
          if (auto at = c.find(key); at != std::string::npos) c.replace(at, 2, value);
        r.outcomes.push_back(RunBounded(c, false));
        if (r.outcomes.back().r.exit_code >= 124) ++crashes;
      }
      r.unchanged = ReadBytes(cut) == bytes;
    }
  };
  std::vector<std::thread> threads;
  const int n = int(std::max(2u, std::thread::hardware_concurrency()));
  for (int i = 0; i < n; ++i) threads.emplace_back(worker, i);
  for (auto& t : threads) t.join();
  CHECK_MESSAGE(crashes < 20, "stopped after 20 crashes or hangs");
  return results;
}

void CheckCuts(const std::vector<CutResult>& results, size_t full_length) {
  for (const CutResult& r : results) {
    if (r.outcomes.empty()) continue;  // not run: stopped early
    CAPTURE(r.length);
    for (const Outcome& o : r.outcomes) {
      CheckSucceedsOrFailsCleanly(o, {r.path});
      if (r.length == full_length) {
        OUTCOME_INFO(o);
        CHECK_MESSAGE(o.r.exit_code == 0, "the whole image must read");
      }
    }
    CHECK_MESSAGE(r.unchanged, "the cut image changed");
  }
}

}  // namespace

TEST_CASE("hostile: every truncation of the first cluster (512-byte clusters), info and convert") {
  for (bool ours : {true, false}) {
    SUBCASE(ours ? "qcow2dedup create" : "qemu-img create") {
      TempDir dir;
      const std::string original = ReadBytes(MakeImage(dir, "orig.qcow2", ours, 512));
      // Every length of the first cluster, then (for our image) a cut
      // either side of every later cluster boundary.
      std::vector<size_t> lengths;
      for (size_t n = 0; n <= 512; ++n) lengths.push_back(n);
      for (size_t b = 1024; ours && b <= original.size(); b += 512) {
        lengths.push_back(b - 1);
        lengths.push_back(b);
        if (b + 1 <= original.size()) lengths.push_back(b + 1);
      }
      if (lengths.back() != original.size()) lengths.push_back(original.size());
      CheckCuts(RunCuts(dir, original, lengths, {"info --output=json %s", "convert -O raw %s %o"}),
                original.size());
      const std::string cut = dir / "cut-check.qcow2";
      for (size_t n : lengths) {
        CAPTURE(n);
        std::ofstream(cut, std::ios::binary | std::ios::trunc).write(original.data(), std::streamsize(n));
        SameCheckAsQemu(cut);
      }
    }
  }
}

TEST_CASE("hostile: truncations of a 64 KiB-cluster image, info only") {
  TempDir dir;
  const std::string original = ReadBytes(MakeImage(dir, "orig.qcow2", false, 64 * KiB));
  std::vector<size_t> lengths;
  // Every length up to past the header extensions, then a stride through
  // the rest of the first clusters (L1, refcount table, refcount block).
  for (size_t n = 0; n <= 640; ++n) lengths.push_back(n);
  for (size_t n = 640 + 1021; n < std::min<size_t>(original.size(), 4 * 64 * KiB); n += 1021) lengths.push_back(n);
  lengths.push_back(original.size());
  CheckCuts(RunCuts(dir, original, lengths, {"info %s"}), original.size());
}

namespace {

struct Patch {
  const char* what;
  // Returns (offset, bytes) to write over the image; header is its first 4 KiB.
  std::function<std::vector<std::pair<uint64_t, std::string>>(const std::string& header, uint64_t file_size)>
      patch;
  // A word the error message must contain (case-insensitive), or empty.
  std::string must_mention;
};

uint64_t ClusterSize(const std::string& h) { return uint64_t(1) << GetBE(h, kClusterBits, 4); }

std::string Lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

using Edits = std::vector<std::pair<uint64_t, std::string>>;

const std::vector<Patch>& Patches() {
  static const std::vector<Patch> patches = {
      {"version 1", [](auto&, auto) { return Edits{{kVersion, BE32(1)}}; }, ""},
      {"version 4", [](auto&, auto) { return Edits{{kVersion, BE32(4)}}; }, ""},
      {"version 0", [](auto&, auto) { return Edits{{kVersion, BE32(0)}}; }, ""},
      {"cluster_bits 8", [](auto&, auto) { return Edits{{kClusterBits, BE32(8)}}; }, ""},
      {"cluster_bits 22", [](auto&, auto) { return Edits{{kClusterBits, BE32(22)}}; }, ""},
      {"cluster_bits 63", [](auto&, auto) { return Edits{{kClusterBits, BE32(63)}}; }, ""},
      {"cluster_bits 0xffffffff", [](auto&, auto) { return Edits{{kClusterBits, BE32(0xffffffff)}}; }, ""},
      {"l1_size 0x7fffffff", [](auto&, auto) { return Edits{{kL1Size, BE32(0x7fffffff)}}; }, ""},
      {"l1_size 0xffffffff", [](auto&, auto) { return Edits{{kL1Size, BE32(0xffffffff)}}; }, ""},
      {"l1_size 0 (too small for the disk)", [](auto&, auto) { return Edits{{kL1Size, BE32(0)}}; }, ""},
      {"l1_table_offset misaligned",
       [](auto& h, auto) { return Edits{{kL1Offset, BE64(GetBE(h, kL1Offset, 8) + 8)}}; }, ""},
      {"l1_table_offset 0", [](auto&, auto) { return Edits{{kL1Offset, BE64(0)}}; }, ""},
      {"refcount_table_offset misaligned",
       [](auto& h, auto) { return Edits{{kRefTableOffset, BE64(GetBE(h, kRefTableOffset, 8) + 8)}}; }, ""},
      {"refcount_table_clusters 0xffffffff",
       [](auto&, auto) { return Edits{{kRefTableClusters, BE32(0xffffffff)}}; }, ""},
      {"header_length 100", [](auto&, auto) { return Edits{{kHeaderLength, BE32(100)}}; }, ""},
      {"header_length 0xffff", [](auto&, auto) { return Edits{{kHeaderLength, BE32(0xffff)}}; }, ""},
      {"header_length 0xfffffff8", [](auto&, auto) { return Edits{{kHeaderLength, BE32(0xfffffff8)}}; }, ""},
      {"header extension longer than the cluster",
       [](auto& h, auto) {
         uint64_t at = GetBE(h, kHeaderLength, 4);
         REQUIRE_MESSAGE(GetBE(h, at, 4) != 0, "the image has no header extension to damage");
         return Edits{{at + 4, BE32(uint32_t(ClusterSize(h)))}};
       },
       ""},
      {"header extension length 0xffffffff",
       [](auto& h, auto) {
         uint64_t at = GetBE(h, kHeaderLength, 4);
         REQUIRE_MESSAGE(GetBE(h, at, 4) != 0, "the image has no header extension to damage");
         return Edits{{at + 4, BE32(0xffffffff)}};
       },
       ""},
      {"refcount_order 7", [](auto&, auto) { return Edits{{kRefcountOrder, BE32(7)}}; }, ""},
      {"refcount_order 0xffffffff", [](auto&, auto) { return Edits{{kRefcountOrder, BE32(0xffffffff)}}; }, ""},
      {"virtual size 2^63", [](auto&, auto) { return Edits{{kSize, BE64(uint64_t(1) << 63)}}; }, ""},
      {"virtual size 2^64-1", [](auto&, auto) { return Edits{{kSize, BE64(~uint64_t(0))}}; }, ""},
      {"virtual size 2^63 with a matching l1_size",
       // Passes the L1-size consistency test: only a size limit stops it.
       [](auto& h, auto) {
         uint64_t cs = ClusterSize(h);
         uint64_t per_l1 = cs * (cs / 8);
         uint64_t l1 = ((uint64_t(1) << 62) / per_l1) * 2;
         return Edits{{kSize, BE64(uint64_t(1) << 63)}, {kL1Size, BE32(uint32_t(std::min<uint64_t>(l1, 0xffffffff)))}};
       },
       ""},
      {"unknown incompatible feature bit 9",
       [](auto& h, auto) { return Edits{{kIncompatible, BE64(GetBE(h, kIncompatible, 8) | (uint64_t(1) << 9))}}; },
       "9"},
      {"unknown incompatible feature bit 63",
       [](auto& h, auto) { return Edits{{kIncompatible, BE64(GetBE(h, kIncompatible, 8) | (uint64_t(1) << 63))}}; },
       "63"},
      {"external data file bit",
       [](auto& h, auto) { return Edits{{kIncompatible, BE64(GetBE(h, kIncompatible, 8) | 4)}}; }, ""},
      {"encrypted (crypt_method 1)", [](auto&, auto) { return Edits{{kCryptMethod, BE32(1)}}; }, ""},
      {"crypt_method 7", [](auto&, auto) { return Edits{{kCryptMethod, BE32(7)}}; }, ""},
      {"nb_snapshots 0xffffffff past EOF",
       [](auto& h, uint64_t fs) {
         uint64_t cs = ClusterSize(h);
         return Edits{{kNbSnapshots, BE32(0xffffffff)}, {kSnapshotsOffset, BE64((fs / cs + 4) * cs)}};
       },
       ""},
      {"snapshots_offset misaligned",
       [](auto&, auto) { return Edits{{kNbSnapshots, BE32(1)}, {kSnapshotsOffset, BE64(12345)}}; }, ""},
      {"backing file name past the first cluster",
       [](auto& h, auto) {
         return Edits{{kBackingOffset, BE64(ClusterSize(h) - 4)}, {kBackingSize, BE32(100)}};
       },
       ""},
      {"backing file name length 0xffffffff",
       [](auto&, auto) { return Edits{{kBackingOffset, BE64(400)}, {kBackingSize, BE32(0xffffffff)}}; }, ""},
  };
  return patches;
}

// Runs info (both outputs) and convert on img, each of which must fail
// cleanly, naming one of names; img and the files in also_unchanged keep
// their bytes. Returns the outcomes.
std::vector<Outcome> CheckAllFail(const TempDir& dir, const std::string& img, const std::vector<std::string>& names,
                                  const std::vector<std::string>& also_unchanged = {},
                                  bool info_may_succeed = false) {
  std::vector<std::string> files = also_unchanged;
  files.insert(files.begin(), img);
  std::vector<std::string> before;
  for (const auto& f : files) before.push_back(FileDigest(f));
  const std::string out = dir / "out.raw";
  std::filesystem::remove(out);
  std::vector<Outcome> outcomes = {RunBounded("info --output=json " + Sh(img)), RunBounded("info " + Sh(img)),
                                   RunBounded("convert -O raw " + Sh(img) + " " + Sh(out)),
                                   RunBounded("convert -f qcow2 -O raw " + Sh(img) + " " + Sh(out + "2"))};
  for (size_t i = 0; i < outcomes.size(); ++i) {
    if (i < 2 && info_may_succeed) CheckSucceedsOrFailsCleanly(outcomes[i], names);
    else CheckFailsCleanly(outcomes[i], names);
  }
  for (size_t i = 0; i < files.size(); ++i) CHECK_MESSAGE(FileDigest(files[i]) == before[i], files[i], " changed");
  return outcomes;
}

}  // namespace

TEST_CASE("hostile: malformed headers") {
  struct Base {
    const char* name;
    bool ours;
    uint64_t cluster_size;
  };
  for (Base b : {Base{"qemu-img, 64 KiB clusters", false, 64 * KiB}, Base{"qcow2dedup, 512-byte clusters", true, 512},
                 Base{"qcow2dedup, 64 KiB clusters", true, 64 * KiB}}) {
    for (const Patch& p : Patches()) {
      std::string name = std::string(b.name) + ": " + p.what;
      SUBCASE(name.c_str()) {
        TempDir dir;
        const std::string img = MakeImage(dir, "img.qcow2", b.ours, b.cluster_size);
        // The undamaged image reads.
        MustRun(Tool() + " info " + Sh(img));
        const std::string header = ReadHeader(img);
        for (auto& [off, bytes] : p.patch(header, ReadBytes(img).size())) PatchFile(img, off, bytes);
        SameCheckAsQemu(img);
        auto outcomes = CheckAllFail(dir, img, {img});
        if (!p.must_mention.empty()) {
          for (const Outcome& o : outcomes) {
            OUTCOME_INFO(o);
            // The path may contain digits: look only at what follows it.
            std::string msg = o.r.err;
            if (auto at = msg.find(img); at != std::string::npos) msg = msg.substr(at + img.size());
            CHECK_MESSAGE(std::regex_search(msg, std::regex("\\b" + p.must_mention + "\\b")),
                          "the message does not name feature bit ", p.must_mention);
          }
        }
      }
    }
  }
}

// Tables past the end of the file read as zeros, as QEMU's block layer
// reads them: qemu-img info opens such an image and convert exports its
// zeros, and so must we (it is not a reason to refuse the file).
TEST_CASE("hostile: tables past the end of the file read as zeros, as qemu-img reads them") {
  REQUIRE_MESSAGE(testing::HaveCommand("qemu-img"), "qemu-img is the judge");
  const std::vector<Patch> patches = {
      {"l1_table_offset beyond EOF",
       [](auto& h, uint64_t fs) {
         uint64_t cs = ClusterSize(h);
         return Edits{{kL1Offset, BE64((fs / cs + 16) * cs)}};
       },
       ""},
      {"l1_table_offset 2^62",
       [](auto& h, auto) { return Edits{{kL1Offset, BE64((uint64_t(1) << 62) - ClusterSize(h))}}; }, ""},
      {"refcount_table_offset beyond EOF",
       [](auto& h, uint64_t fs) {
         uint64_t cs = ClusterSize(h);
         return Edits{{kRefTableOffset, BE64((fs / cs + 16) * cs)}};
       },
       ""},
  };
  for (bool ours : {false, true}) {
    for (const Patch& p : patches) {
      CAPTURE(ours);
      CAPTURE(p.what);
      TempDir dir;
      const std::string img = MakeImage(dir, "img.qcow2", ours, 64 * KiB);
      const std::string header = ReadHeader(img);
      for (auto& [off, bytes] : p.patch(header, ReadBytes(img).size())) PatchFile(img, off, bytes);
      const std::string before = FileDigest(img);
      const RunResult qinfo = Run("qemu-img info " + Sh(img));
      REQUIRE_MESSAGE(qinfo.exit_code == 0, "qemu-img info refuses it: ", qinfo.err);
      const Outcome info = RunBounded("info " + Sh(img));
      OUTCOME_INFO(info);
      CHECK(info.r.exit_code == 0);
      const std::string theirs = dir / "theirs.raw", mine = dir / "ours.raw";
      MustRun("qemu-img convert -f qcow2 -O raw " + Sh(img) + " " + Sh(theirs));
      const Outcome conv = RunBounded("convert -O raw " + Sh(img) + " " + Sh(mine));
      OUTCOME_INFO(conv);
      REQUIRE(conv.r.exit_code == 0);
      CHECK_MESSAGE(ReadBytes(mine) == ReadBytes(theirs), "convert -O raw differs from qemu-img's");
      SameCheckAsQemu(img);
      CHECK(FileDigest(img) == before);
    }
  }
}

TEST_CASE("hostile: an unknown incompatible feature named in the feature table") {
  // QEMU names unknown features from the image's own feature name table.
  TempDir dir;
  const std::string img = MakeImage(dir, "img.qcow2", false, 64 * KiB);
  std::string h = ReadHeader(img);
  uint64_t at = GetBE(h, kHeaderLength, 4);
  bool patched = false;
  while (at + 8 <= h.size()) {
    uint32_t magic = uint32_t(GetBE(h, at, 4)), len = uint32_t(GetBE(h, at + 4, 4));
    if (magic == 0) break;
    if (magic == 0x6803f857 && len >= 48) {
      std::string entry(48, '\0');
      entry[0] = 0;  // incompatible
      entry[1] = 9;  // bit 9
      std::string name = "frobnicated blocks";
      entry.replace(2, name.size(), name);
      PatchFile(img, at + 8, entry);
      patched = true;
      break;
    }
    at += 8 + ((len + 7) / 8) * 8;
  }
  REQUIRE_MESSAGE(patched, "qemu-img wrote no feature name table");
  PatchFile(img, kIncompatible, BE64(GetBE(h, kIncompatible, 8) | (uint64_t(1) << 9)));
  SameCheckAsQemu(img);
  auto outcomes = CheckAllFail(dir, img, {img});
  for (const Outcome& o : outcomes) {
    OUTCOME_INFO(o);
    CHECK(o.r.err.find("frobnicated blocks") != std::string::npos);
  }
}

TEST_CASE("hostile: bad magic") {
  // Without the magic the file is not qcow2: info and convert may take it as
  // raw (as qemu-img does), but convert -f qcow2 must refuse it.
  TempDir dir;
  const std::string img = MakeImage(dir, "img.qcow2", false, 64 * KiB);
  PatchFile(img, kMagic, "QFIX");
  const std::string before = FileDigest(img);
  Outcome info = RunBounded("info --output=json " + Sh(img));
  CheckSucceedsOrFailsCleanly(info, {img});
  if (info.r.exit_code == 0) {
    OUTCOME_INFO(info);
    auto j = nlohmann::json::parse(info.r.out, nullptr, false);
    CHECK(!j.is_discarded());
    if (!j.is_discarded()) CHECK(j.value("format", "") == "raw");
  }
  Outcome conv = RunBounded("convert -f qcow2 -O raw " + Sh(img) + " " + Sh(dir / "out.raw"));
  CheckFailsCleanly(conv, {img});
  SameCheckAsQemu(img);
  CHECK(FileDigest(img) == before);
}

TEST_CASE("hostile: backing file problems") {
  auto make = [](const TempDir& dir, const std::string& name) {
    const std::string img = dir / name;
    MustRun("qemu-img create -q -f qcow2 " + Sh(img) + " 4M");
    QemuIo(img, {"write -q -P 0x44 0 64k"});
    return img;
  };
  // qemu-img info does not open backing files, so it succeeds on each of
  // these; qcow2dedup info may succeed too. convert must fail.
  SUBCASE("backing file is the image itself") {
    TempDir dir;
    const std::string img = make(dir, "self.qcow2");
    MustRun("qemu-img rebase -u -F qcow2 -b self.qcow2 " + Sh(img));
    auto outcomes = CheckAllFail(dir, img, {img}, {}, /*info_may_succeed=*/true);
    for (const Outcome& o : outcomes) {
      OUTCOME_INFO(o);
      if (o.r.exit_code != 0) CHECK(Lower(o.r.err).find("loop") != std::string::npos);
    }
  }
  SUBCASE("two images that back each other") {
    TempDir dir;
    const std::string a = make(dir, "a.qcow2"), b = make(dir, "b.qcow2");
    MustRun("qemu-img rebase -u -F qcow2 -b b.qcow2 " + Sh(a));
    MustRun("qemu-img rebase -u -F qcow2 -b a.qcow2 " + Sh(b));
    auto outcomes = CheckAllFail(dir, a, {a, b, "b.qcow2", "./b.qcow2", "a.qcow2", "./a.qcow2"}, {b},
                                 /*info_may_succeed=*/true);
    for (const Outcome& o : outcomes) {
      OUTCOME_INFO(o);
      if (o.r.exit_code != 0) CHECK(Lower(o.r.err).find("loop") != std::string::npos);
    }
  }
  SUBCASE("a long chain that loops at its end") {
    TempDir dir;
    std::vector<std::string> imgs;
    for (int i = 0; i < 6; ++i) imgs.push_back(make(dir, "c" + N(i) + ".qcow2"));
    for (int i = 0; i < 6; ++i)
      MustRun("qemu-img rebase -u -F qcow2 -b c" + N(i == 5 ? 3 : i + 1) + ".qcow2 " + Sh(imgs[size_t(i)]));
    auto outcomes = CheckAllFail(dir, imgs[0], imgs, {imgs.begin() + 1, imgs.end()}, true);
    for (const Outcome& o : outcomes) {
      OUTCOME_INFO(o);
      if (o.r.exit_code != 0) CHECK(Lower(o.r.err).find("loop") != std::string::npos);
    }
  }
  SUBCASE("backing file missing") {
    TempDir dir;
    const std::string img = make(dir, "img.qcow2");
    MustRun("qemu-img rebase -u -F qcow2 -b missing.qcow2 " + Sh(img));
    auto outcomes = CheckAllFail(dir, img, {img, dir / "missing.qcow2", "missing.qcow2", "./missing.qcow2"}, {}, true);
    Outcome info = outcomes[0];
    if (info.r.exit_code == 0) {
      // Then it says what qemu-img says.
      CompareInfo(nlohmann::json::parse(info.r.out), QemuInfo(img));
    }
    for (const Outcome& o : outcomes) {
      OUTCOME_INFO(o);
      if (o.r.exit_code != 0) CHECK(o.r.err.find("missing.qcow2") != std::string::npos);
    }
  }
  SUBCASE("backing file is a directory") {
    TempDir dir;
    const std::string img = make(dir, "img.qcow2");
    std::filesystem::create_directory(dir / "adir");
    MustRun("qemu-img rebase -u -F raw -b adir " + Sh(img));
    CheckAllFail(dir, img, {img, dir / "adir", "adir", "./adir"}, {}, true);
  }
  SUBCASE("backing file is a damaged qcow2 image") {
    TempDir dir;
    const std::string base = make(dir, "base.qcow2");
    const std::string img = make(dir, "img.qcow2");
    MustRun("qemu-img rebase -u -F qcow2 -b base.qcow2 " + Sh(img));
    PatchFile(base, kClusterBits, BE32(40));
    CheckAllFail(dir, img, {img, base, "base.qcow2", "./base.qcow2"}, {base}, true);
  }
}

namespace {

constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;

// Where things are in an image with data at guest offset 0.
struct Tables {
  uint64_t cluster_size, l1, l2, data, reftable, file_size;
};

Tables FindTables(const std::string& img) {
  const std::string bytes = ReadBytes(img);
  Tables t;
  t.cluster_size = ClusterSize(bytes);
  t.l1 = GetBE(bytes, kL1Offset, 8);
  t.l2 = GetBE(bytes, t.l1, 8) & kOffsetMask;
  REQUIRE(t.l2 != 0);
  t.data = GetBE(bytes, t.l2, 8) & kOffsetMask;
  REQUIRE(t.data != 0);
  t.reftable = GetBE(bytes, kRefTableOffset, 8);
  t.file_size = bytes.size();
  return t;
}

struct TablePatch {
  const char* what;
  std::function<Edits(const Tables&)> patch;
  bool must_fail;  // else: success or a clean failure
  bool big_clusters_only = false;  // misalignment needs clusters above 512 bytes
};

}  // namespace

TEST_CASE("hostile: damaged L1/L2 tables and snapshot table") {
  const uint64_t kCopied = uint64_t(1) << 63, kCompressed = uint64_t(1) << 62;
  const std::vector<TablePatch> patches = {
      {"L2 table offset not cluster aligned",
       [=](const Tables& t) { return Edits{{t.l1, BE64((t.l2 + 512) | kCopied)}}; }, true, true},
      {"L2 table beyond the end of the file",
       [=](const Tables& t) { return Edits{{t.l1, BE64(((t.file_size / t.cluster_size + 100) * t.cluster_size) | kCopied)}}; },
       false},
      {"L2 table at 2^55",
       [=](const Tables& t) { return Edits{{t.l1, BE64((uint64_t(1) << 55) | kCopied)}}; }, false},
      {"L2 table is the refcount table",
       [=](const Tables& t) { return Edits{{t.l1, BE64(t.reftable | kCopied)}}; }, false},
      {"L2 table is the L1 table",
       [=](const Tables& t) { return Edits{{t.l1, BE64((t.l1 / t.cluster_size * t.cluster_size) | kCopied)}}; },
       false},
      {"data cluster not aligned",
       [=](const Tables& t) { return Edits{{t.l2, BE64((t.data + 512) | kCopied)}}; }, true, true},
      {"data cluster beyond the end of the file",
       [=](const Tables& t) { return Edits{{t.l2, BE64(((t.file_size / t.cluster_size + 100) * t.cluster_size) | kCopied)}}; },
       false},
      {"data cluster at 2^55 - cluster",
       [=](const Tables& t) { return Edits{{t.l2, BE64(((uint64_t(1) << 55) - t.cluster_size) | kCopied)}}; }, false},
      {"compressed cluster of garbage (the header)",
       [=](const Tables& t) { return Edits{{t.l2, BE64(kCompressed | 0)}}; }, false},
      {"compressed cluster with the largest sector count, beyond EOF",
       [=](const Tables& t) {
         int x = 62 - (int(std::countr_zero(t.cluster_size)) - 8);
         uint64_t sectors = (uint64_t(1) << (62 - x)) - 1;
         return Edits{{t.l2, BE64(kCompressed | (sectors << x) | (t.file_size - 512))}};
       },
       false},
      {"every reserved bit of an L2 entry",
       [=](const Tables& t) { return Edits{{t.l2, BE64(t.data | kCopied | 0x3f000000000001feull)}}; }, false},
      {"every reserved bit of an L1 entry",
       [=](const Tables& t) { return Edits{{t.l1, BE64(t.l2 | kCopied | 0x7f000000000001ffull)}}; }, false},
  };
  for (const TablePatch& p : patches) {
    for (uint64_t cs : {uint64_t(512), 64 * KiB}) {
      if (p.big_clusters_only && cs == 512) continue;
      std::string name = std::string(p.what) + " cluster_size=" + N(cs);
      SUBCASE(name.c_str()) {
        TempDir dir;
        const std::string img = MakeImage(dir, "img.qcow2", false, cs);
        Tables t = FindTables(img);
        for (auto& [off, bytes] : p.patch(t)) PatchFile(img, off, bytes);
        const std::string before = FileDigest(img);
        SameCheckAsQemu(img);
        const std::string out = dir / "out.raw";
        for (const std::string& args : {"info --output=json " + Sh(img), "convert -O raw " + Sh(img) + " " + Sh(out),
                                        "convert -O qcow2 " + Sh(img) + " " + Sh(dir / "dd.qcow2")}) {
          Outcome o = RunBounded(args);
          bool reads_data = args.rfind("convert", 0) == 0;
          if (p.must_fail && reads_data) CheckFailsCleanly(o, {img});
          else CheckSucceedsOrFailsCleanly(o, {img});
        }
        CHECK(FileDigest(img) == before);
      }
    }
  }

  SUBCASE("snapshot table entries that overrun") {
    struct S {
      const char* what;
      uint64_t field_offset;  // within the snapshot header
      std::string bytes;
    };
    for (S s : {S{"extra_data_size 0xffffffff", 36, BE32(0xffffffff)}, S{"id_str_size 0xffff", 12, BE16(0xffff)},
                S{"name_size 0xffff", 14, BE16(0xffff)}, S{"snapshot l1_size 0xffffffff", 8, BE32(0xffffffff)},
                S{"snapshot l1 offset misaligned", 0, BE64(12345)}}) {
      CAPTURE(s.what);
      TempDir dir;
      const std::string img = MakeImage(dir, "img.qcow2", false, 64 * KiB);
      MustRun("qemu-img snapshot -c s1 " + Sh(img));
      MustRun("qemu-img snapshot -c s2 " + Sh(img));
      const std::string h = ReadHeader(img);
      uint64_t table = GetBE(h, kSnapshotsOffset, 8);
      PatchFile(img, table + s.field_offset, s.bytes);
      const std::string before = FileDigest(img);
      Outcome info = RunBounded("info --output=json " + Sh(img));
      CheckSucceedsOrFailsCleanly(info, {img});
      Outcome conv = RunBounded("convert -O raw " + Sh(img) + " " + Sh(dir / "out.raw"));
      CheckSucceedsOrFailsCleanly(conv, {img});
      SameCheckAsQemu(img);
      CHECK(FileDigest(img) == before);
    }
  }
}
