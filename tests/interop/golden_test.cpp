// Golden tests of the CLI's human output: for every case under
// tests/golden/, exact stdout, stderr and exit code (zstd's cli-tests in
// spirit). Each case is a directory holding
//
//   cmd     the command line, shell words, run by /bin/sh (`qcow2dedup` is
//           the binary under test); the working directory is a fresh
//           temporary directory, so the file names in the output are the
//           relative names of the command line
//   setup   optional: the name of the fixture that fills that directory
//           first (see kFixtures below); every input is made from fixed
//           patterns here, nothing random and no timestamps
//   stdout  the exact expected standard output
//   stderr  the exact expected standard error
//   exit    the expected exit code
//   qemu    optional: the same command for qemu-img (`qemu-img check ...`),
//           run on the same fixture; its stdout, stderr and exit code must
//           be ours with our own part left out (support/check_output.h)
//
// On a mismatch the test shows `diff -u expected actual`.
//
// To (re)generate stdout, stderr and exit after a deliberate change of the
// output (or for a new case: write its cmd, and setup if it needs inputs):
//
//   QCOW2DEDUP_UPDATE_GOLDEN=1 ctest --test-dir BUILD -R golden_test
//
// then read every changed file (`git diff tests/golden`) and check each
// number against the inputs: a golden that enshrines a wrong result is
// worse than none. The numbers of the fixtures below are worked out in
// tests/golden/README.md.
//
// Parity with qemu-img: a case may also hold
//
//   qemu-cmd      qemu-img's command line for the same thing, run the same
//                 way in another fresh directory with the same fixture
//   qemu-compare  optional: which of our outputs must be qemu-img's, words
//                 from "stdout stderr exit" (the default: all three) and
//                 "option-names" (every "  name=<type> - " line we print
//                 begins one of qemu-img's lines: -o help lists a subset;
//                 a line ending "(qcow2dedup)" is an option of ours alone)
//                 "stderr-one-line" (qemu-img's stderr with each error's
//                 continuation lines joined to it by a space: an error of
//                 ours is one line, in qemu-img's words) and
//                 "no-dedup" (our stdout without what info adds for the
//                 dedup index: its "Dedup:" block, its "dedup" JSON key)
//
// qemu-img's output, with "qemu-img" read as "qcow2dedup", must then equal
// ours: a script written for qemu-img sees no difference. The goldens still
// hold our output, so that a change of it shows in the diff.
//
// Not golden: --help (it changes whenever an option is added), -p (rates
// and times), and anything with the date or the machine in it.
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "support/check_output.h"
#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/temp_dir.h"

using testing::Run;
using testing::Sh;
using testing::TempDir;
namespace fs = std::filesystem;

namespace {

constexpr uint64_t kCluster = 64 << 10;  // the default cluster size
constexpr uint64_t kDiskClusters = 64;   // disk.raw: 4 MiB

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void Spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << bytes;
  REQUIRE_MESSAGE(f.good(), "cannot write " << path);
}

// Runs a setup command in dir; it must succeed.
void MustRun(const std::string& dir, const std::string& cmd) {
  auto r = Run("cd " + Sh(dir) + " && " + cmd);
  REQUIRE_MESSAGE(r.exit_code == 0, "setup command failed: " << cmd << "\n" << r.out << r.err);
}

// disk.raw, 4 MiB: 64 clusters of 64 KiB, each one of these.
//   A (all 0x11): clusters 0 3 6 9 12 15 18 21 24   (9 times)
//   B (all 0x22): clusters 1 4 7 10 13              (5 times)
//   C (all 0x33): clusters 2 5 8                    (3 times)
//   D (all 0x44): clusters 11 14                    (2 times)
//   U: clusters 16 17 19 20 30, each 4 KiB block of them distinct: filled
//      with 0x80 + cluster, its first two bytes the cluster and the block
//   zero: every other cluster (39 of them), written out as zeros (a dense
//      file: its disk size does not depend on how a file system keeps holes)
char ClusterKind(uint64_t c) {
  static const std::map<uint64_t, char> kinds = {
      {0, 'A'},  {3, 'A'},  {6, 'A'},  {9, 'A'},  {12, 'A'}, {15, 'A'}, {18, 'A'}, {21, 'A'},
      {24, 'A'}, {1, 'B'},  {4, 'B'},  {7, 'B'},  {10, 'B'}, {13, 'B'}, {2, 'C'},  {5, 'C'},
      {8, 'C'},  {11, 'D'}, {14, 'D'}, {16, 'U'}, {17, 'U'}, {19, 'U'}, {20, 'U'}, {30, 'U'}};
  auto it = kinds.find(c);
  return it == kinds.end() ? '0' : it->second;
}

std::string DiskBytes() {
  std::string disk(kDiskClusters * kCluster, '\0');
  for (uint64_t c = 0; c < kDiskClusters; ++c) {
    char* p = disk.data() + c * kCluster;
    switch (ClusterKind(c)) {
      case 'A': std::fill(p, p + kCluster, char(0x11)); break;
      case 'B': std::fill(p, p + kCluster, char(0x22)); break;
      case 'C': std::fill(p, p + kCluster, char(0x33)); break;
      case 'D': std::fill(p, p + kCluster, char(0x44)); break;
      case 'U':
        std::fill(p, p + kCluster, char(0x80 + c));
        for (uint64_t b = 0; b < kCluster / 4096; ++b) {
          p[b * 4096] = char(c);
          p[b * 4096 + 1] = char(b);
        }
        break;
      default: break;
    }
  }
  return disk;
}

void MakeRaw(const std::string& dir) { Spit(dir + "/disk.raw", DiskBytes()); }

// disk.qcow2: disk.raw converted by the tool (64 KiB clusters, 16-bit refcounts).
void MakeDedup(const std::string& dir) {
  MakeRaw(dir);
  MustRun(dir, testing::Tool() + " convert -q disk.raw disk.qcow2");
}

// Sets the stored refcount of the host cluster at host_offset, in place
// (16-bit refcounts, as our images have by default).
void SetRefcount(const std::string& path, uint64_t host_offset, uint64_t value) {
  std::string error;
  auto layout = testing::ReadQcow2Layout(path, &error);
  REQUIRE_MESSAGE(layout.has_value(), error);
  REQUIRE(layout->refcount_bits == 16);
  std::string bytes = testing::ReadFileBytes(path);
  auto be = [&bytes](uint64_t off, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | uint8_t(bytes.at(off + i));
    return v;
  };
  const uint64_t cs = layout->cluster_size;
  const uint64_t per_block = cs * 8 / 16;
  const uint64_t n = host_offset / cs;
  const uint64_t block = be(layout->reftable_offset + n / per_block * 8, 8) & testing::Qcow2Layout::kOffsetMask;
  REQUIRE(block != 0);
  const uint64_t at = block + n % per_block * 2;
  bytes.at(at) = char(value >> 8);
  bytes.at(at + 1) = char(value);
  testing::WriteFileBytes(path, bytes);
}

// Host offset of the data of guest cluster g of disk.qcow2.
uint64_t HostOf(const std::string& path, uint64_t g) {
  std::string error;
  auto layout = testing::ReadQcow2Layout(path, &error);
  REQUIRE_MESSAGE(layout.has_value(), error);
  const uint64_t host = layout->HostOffset(g);
  REQUIRE(host != 0);
  return host;
}

// A fleet of VM disks over disk.raw as their template, for dedup-stats
// --simulate over several images (numbers in tests/golden/README.md):
//   base.raw   disk.raw
//   vm1.raw    disk.raw, cluster 0 (an A) all 0x66, cluster 40 (zero) all 0x55
//   vm1.qcow2  vm1.raw converted
//   vm2.raw    disk.raw, clusters 41 and 42 all 0x55, cluster 16 (a U) zero
//   small.raw  disk.raw's first 2 MiB, cluster 31 (zero) all 0x55
//   big.raw    disk.raw and 1 MiB more, of which cluster 64 is an A (0x11)
void MakeFleet(const std::string& dir) {
  const std::string disk = DiskBytes();
  auto with = [&disk](std::string bytes, std::initializer_list<std::pair<uint64_t, char>> fills) {
    for (auto [c, fill] : fills) std::fill_n(bytes.begin() + c * kCluster, kCluster, fill);
    return bytes;
  };
  Spit(dir + "/base.raw", disk);
  Spit(dir + "/vm1.raw", with(disk, {{0, char(0x66)}, {40, char(0x55)}}));
  Spit(dir + "/vm2.raw", with(disk, {{41, char(0x55)}, {42, char(0x55)}, {16, '\0'}}));
  Spit(dir + "/small.raw", with(disk.substr(0, 32 * kCluster), {{31, char(0x55)}}));
  Spit(dir + "/big.raw", with(disk + std::string(16 * kCluster, '\0'), {{64, char(0x11)}}));
  MustRun(dir, testing::Tool() + " convert -q vm1.raw vm1.qcow2");
}

// disk.qcow2 with two persistent bitmaps, made by qemu-img: bm0 (64 KiB
// granularity, enabled: flag auto) and second (128 KiB, disabled: no flags).
void MakeBitmaps(const std::string& dir) {
  MakeDedup(dir);
  MustRun(dir, "qemu-img bitmap --add disk.qcow2 bm0 && qemu-img bitmap --add -g 128k --disable disk.qcow2 second");
}

// Sets the in-use flag of the first bitmap in place, as a QEMU killed while
// it had the image open leaves it (bits 0: in-use, of the entry's flags).
void SetFirstBitmapInUse(const std::string& path) {
  std::string bytes = testing::ReadFileBytes(path);
  auto be = [&bytes](uint64_t off, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | uint8_t(bytes.at(off + i));
    return v;
  };
  uint64_t pos = be(100, 4);  // header_length: the extensions follow
  for (;;) {
    const uint64_t type = be(pos, 4), len = be(pos + 4, 4);
    REQUIRE_MESSAGE(type != 0, "no bitmaps extension in " << path);
    if (type == 0x23852875) break;
    pos += 8 + (len + 7) / 8 * 8;
  }
  const uint64_t dir = be(pos + 8 + 16, 8);
  bytes.at(dir + 15) = char(uint8_t(bytes.at(dir + 15)) | 1);
  testing::WriteFileBytes(path, bytes);
}

const std::map<std::string, std::function<void(const std::string&)>> kFixtures = {
    // Nothing: the command makes its own files (or fails to find them).
    {"none", [](const std::string&) {}},
    // disk.raw (above).
    {"raw", MakeRaw},
    // disk.raw and disk.qcow2, its dedup image: 24 data clusters stored in 9.
    {"dedup", MakeDedup},
    // empty.qcow2: `create empty.qcow2 4M`, no data; and disk.raw to write into it.
    {"empty",
     [](const std::string& dir) {
       MakeRaw(dir);
       MustRun(dir, testing::Tool() + " create -q empty.qcow2 4M");
     }},
    // top.qcow2, made by qemu-img, over disk.qcow2 (ours) as its backing file.
    {"backing",
     [](const std::string& dir) {
       MakeDedup(dir);
       MustRun(dir, "qemu-img create -q -f qcow2 -b disk.qcow2 -F qcow2 top.qcow2");
     }},
    {"bitmaps", MakeBitmaps},
    // disk.qcow2 with internal snapshot 1 "first" of disk.raw's data, then
    // QEMU's 0x77 over its first 1 MiB (the current view differs from it).
    {"snapshot",
     [](const std::string& dir) {
       MakeDedup(dir);
       MustRun(dir, "qemu-img snapshot -c first disk.qcow2 && qemu-io -c 'write -P 0x77 0 1M' disk.qcow2 >/dev/null");
     }},
    // The same, bm0 left in use.
    {"bitmaps-in-use",
     [](const std::string& dir) {
       MakeBitmaps(dir);
       SetFirstBitmapInUse(dir + "/disk.qcow2");
     }},
    // disk.qcow2 after QEMU wrote B's bytes over guest cluster 0 (an A):
    // the index is out of sync, B is stored twice (a missed dedup), A has 8
    // references left; QEMU put the new cluster at the end of the image.
    {"dedup-qemu-written",
     [](const std::string& dir) {
       MakeDedup(dir);
       MustRun(dir, "qemu-io -c 'write -P 0x22 0 64k' disk.qcow2");
     }},
    // disk.qcow2 with two leaks: the refcount of A's cluster 9 -> 10, of
    // B's 5 -> 7 (refcounts above 1 both, so the COPIED flags stay right).
    {"dedup-leaks",
     [](const std::string& dir) {
       MakeDedup(dir);
       const std::string img = dir + "/disk.qcow2";
       SetRefcount(img, HostOf(img, 0), 10);
       SetRefcount(img, HostOf(img, 1), 7);
     }},
    // disk.qcow2 with one corruption: the refcount of C's cluster 3 -> 2,
    // below its 3 references (still above 1: the COPIED flags stay right).
    {"dedup-corrupt",
     [](const std::string& dir) {
       MakeDedup(dir);
       const std::string img = dir + "/disk.qcow2";
       SetRefcount(img, HostOf(img, 2), 2);
     }},
    // disk.qcow2 cut to 40 bytes: the header is incomplete.
    {"truncated-header",
     [](const std::string& dir) {
       MakeDedup(dir);
       REQUIRE(::truncate((dir + "/disk.qcow2").c_str(), 40) == 0);
     }},
    // disk.qcow2 cut 100 bytes into its dedup index (at the image end,
    // 917504): the header still vouches for 9 entries, 3 are there.
    {"truncated-index",
     [](const std::string& dir) {
       MakeDedup(dir);
       REQUIRE(::truncate((dir + "/disk.qcow2").c_str(), 917504 + 100) == 0);
     }},
    // disk.qcow2 cut after its first 3 clusters (header, refcount table and
    // refcount block): the L1 table and everything after it are gone.
    {"truncated-body",
     [](const std::string& dir) {
       MakeDedup(dir);
       REQUIRE(::truncate((dir + "/disk.qcow2").c_str(), 3 * kCluster) == 0);
     }},    {"fleet", MakeFleet},
};

// qemu-img's output as ours reads: its name replaced by ours.
std::string AsOurs(std::string text) {
  const std::string from = "qemu-img", to = "qcow2dedup";
  for (size_t pos = 0; (pos = text.find(from, pos)) != std::string::npos; pos += to.size())
    text.replace(pos, from.size(), to);
  return text;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = std::min(text.find('\n', pos), text.size());
    lines.push_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return lines;
}

// "option-names": each of our "  name=<type> ... - " lines names an option
// with the type qemu-img gives it.
void CheckOptionNames(const std::string& ours, const std::string& qemu) {
  const auto qemu_lines = Lines(qemu);
  for (const std::string& line : Lines(ours)) {
    if (line.rfind("  ", 0) != 0 || line.find(" - ") == std::string::npos) continue;
    if (line.ends_with("(qcow2dedup)")) continue;  // ours alone, and says so
    const std::string head = line.substr(0, line.find(" - "));
    const std::string name = head.substr(0, head.find_last_not_of(' ') + 1);
    const bool found = std::any_of(qemu_lines.begin(), qemu_lines.end(),
                                   [&](const std::string& q) { return q.rfind(name + " ", 0) == 0; });
    CHECK_MESSAGE(found, "qemu-img's -o help has no option " << name);
  }
}

// Our info output as qemu-img would print it: without the dedup state we add.
std::string WithoutDedup(const std::string& out) {
  std::vector<std::string> kept;
  if (!out.empty() && (out[0] == '{' || out[0] == '[')) {
    // Textually, so that the layout stays ours: the "dedup" object is the
    // last key of its image, its lines up to the "}" at its indent.
    std::string closing;
    for (const std::string& line : Lines(out)) {
      if (!closing.empty()) {
        if (line.rfind(closing, 0) == 0 && line.size() <= closing.size() + 1) closing.clear();
        continue;
      }
      const size_t key = line.find("\"dedup\": {");
      if (key != std::string::npos && line.find_first_not_of(' ') == key) {
        closing = line.substr(0, key) + "}";
        if (!kept.empty() && kept.back().ends_with(",")) kept.back().pop_back();
        continue;
      }
      kept.push_back(line);
    }
  } else {
    bool in_dedup = false;
    for (const std::string& line : Lines(out)) {
      if (line == "Dedup:") in_dedup = true;
      else if (line.rfind("    ", 0) != 0) in_dedup = false;
      if (!in_dedup) kept.push_back(line);
    }
  }
  std::string text;
  for (const std::string& line : kept) text += line + "\n";
  return text;
}

struct Case {
  std::string name, dir;
};

std::string GoldenRoot() { return std::string(QCOW2DEDUP_SOURCE_DIR) + "/tests/golden"; }

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (const auto& e : fs::directory_iterator(GoldenRoot()))
    if (e.is_directory()) cases.push_back({e.path().filename().string(), e.path().string()});
  std::sort(cases.begin(), cases.end(), [](const Case& a, const Case& b) { return a.name < b.name; });
  return cases;
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// `diff -u` of what was expected and what came, for the failure message.
std::string Diff(const std::string& expected, const std::string& actual) {
  TempDir tmp;
  Spit(tmp / "expected", expected);
  Spit(tmp / "actual", actual);
  return Run("cd " + Sh(tmp.path()) + " && diff -u expected actual").out;
}

bool Updating() {
  const char* v = std::getenv("QCOW2DEDUP_UPDATE_GOLDEN");
  return v && *v && std::string(v) != "0";
}

bool StartsWith(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

}  // namespace

TEST_CASE("golden: the CLI's exact stdout, stderr and exit code for every case in tests/golden") {
  // The command line says `qcow2dedup`: a directory on PATH with only that name in it.
  TempDir bin;
  REQUIRE(::symlink(QCOW2DEDUP_BIN, (bin / "qcow2dedup").c_str()) == 0);

  const auto cases = Cases();
  REQUIRE(cases.size() > 0);
  for (const Case& c : cases) {
    CAPTURE(c.name);
    const std::string cmd_path = c.dir + "/cmd";
    REQUIRE_MESSAGE(fs::exists(cmd_path), c.name << ": no cmd file");
    const std::string cmd = Trim(Slurp(cmd_path));
    std::string fixture = "none";
    if (fs::exists(c.dir + "/setup")) fixture = Trim(Slurp(c.dir + "/setup"));
    auto f = kFixtures.find(fixture);
    REQUIRE_MESSAGE(f != kFixtures.end(), c.name << ": unknown setup '" << fixture << "'");

    TempDir work;
    f->second(work.path());
    // C locale: strerror's words; no TZ or terminal width matters here.
    auto r = Run("cd " + Sh(work.path()) + " || exit 125\nexport LC_ALL=C PATH=" + Sh(bin.path()) +
                 ":\"$PATH\"\n" + cmd);
    const std::string exit_text = std::to_string(r.exit_code) + "\n";

    if (fs::exists(c.dir + "/qemu-cmd")) {
      const std::string qemu_cmd = Trim(Slurp(c.dir + "/qemu-cmd"));
      std::string compare = "stdout stderr exit";
      if (fs::exists(c.dir + "/qemu-compare")) compare = Slurp(c.dir + "/qemu-compare");
      TempDir qemu_work;
      f->second(qemu_work.path());
      // A missing judge fails the case: the command then exits 127.
      auto q = Run("cd " + Sh(qemu_work.path()) + " || exit 125\nexport LC_ALL=C\n" + qemu_cmd);
      REQUIRE_MESSAGE(q.exit_code != 127, c.name << ": qemu-img did not run: " << q.err);
      auto wants = [&](const char* word) { return compare.find(word) != std::string::npos; };
      const std::string qemu_out = AsOurs(q.out);
      std::string qemu_err = AsOurs(q.err);
      if (wants("stderr-one-line")) {
        const std::string continuation = "\nqcow2dedup: ";
        for (size_t pos; (pos = qemu_err.find(continuation)) != std::string::npos && pos + 1 < qemu_err.size();)
          qemu_err.replace(pos, continuation.size(), " ");
      }
      const std::string our_out = wants("no-dedup") ? WithoutDedup(r.out) : r.out;
      if (wants("stdout"))
        CHECK_MESSAGE(our_out == qemu_out, c.name << ": stdout differs from qemu-img's (`" << qemu_cmd << "`)\n"
                                                << Diff(qemu_out, our_out));
      if (wants("stderr") || wants("stderr-one-line"))
        CHECK_MESSAGE(r.err == qemu_err, c.name << ": stderr differs from qemu-img's (`" << qemu_cmd << "`)\n"
                                                << Diff(qemu_err, r.err));
      if (wants("exit"))
        CHECK_MESSAGE(r.exit_code == q.exit_code,
                      c.name << ": exit code " << r.exit_code << ", qemu-img's " << q.exit_code);
      if (wants("option-names")) CheckOptionNames(r.out, q.out);
    }

    if (Updating()) {
      Spit(c.dir + "/stdout", r.out);
      Spit(c.dir + "/stderr", r.err);
      Spit(c.dir + "/exit", exit_text);
      MESSAGE("updated " << c.name);
      continue;
    }
    for (const char* name : {"stdout", "stderr", "exit"})
      REQUIRE_MESSAGE(fs::exists(c.dir + "/" + name),
                      c.name << ": no " << name << " file (generate it with QCOW2DEDUP_UPDATE_GOLDEN=1)");
    const std::string want_out = Slurp(c.dir + "/stdout"), want_err = Slurp(c.dir + "/stderr"),
                      want_exit = Slurp(c.dir + "/exit");
    // Bools, so that a failure shows the diff rather than both whole texts.
    const bool same_out = r.out == want_out, same_err = r.err == want_err, same_exit = exit_text == want_exit;
    CHECK_MESSAGE(same_out, c.name << ": stdout differs from " << c.dir << "/stdout (`" << cmd << "`)\n"
                                   << Diff(want_out, r.out));
    CHECK_MESSAGE(same_err, c.name << ": stderr differs from " << c.dir << "/stderr (`" << cmd << "`)\n"
                                   << Diff(want_err, r.err));
    CHECK_MESSAGE(same_exit, c.name << ": exit code " << r.exit_code << ", expected " << Trim(want_exit) << " (`"
                                    << cmd << "`)");
  }
}

// Where qemu-img has the same feature, the same input and the same
// options give the same qcow2 part of the output: qemu-img is the judge of
// the goldens that have a `qemu` file (a missing qemu-img fails).
TEST_CASE("golden: qemu-img prints the same for the qcow2 part, on both streams") {
  REQUIRE_MESSAGE(testing::HaveCommand("qemu-img"), "qemu-img is the judge of these cases");
  int compared = 0;
  for (const Case& c : Cases()) {
    if (!fs::exists(c.dir + "/qemu")) continue;
    CAPTURE(c.name);
    const std::string cmd = Trim(Slurp(c.dir + "/qemu"));
    REQUIRE_MESSAGE(StartsWith(cmd, "qemu-img "), c.name << ": the qemu file must hold a qemu-img command");
    std::string fixture = fs::exists(c.dir + "/setup") ? Trim(Slurp(c.dir + "/setup")) : "none";
    auto f = kFixtures.find(fixture);
    REQUIRE(f != kFixtures.end());
    TempDir work;
    f->second(work.path());
    auto q = Run("cd " + Sh(work.path()) + " || exit 125\nexport LC_ALL=C\n" + cmd);
    const bool json = cmd.find("--output=json") != std::string::npos;
    const testing::QcowPart theirs = testing::QcowPartOf(q.out, q.err, json);
    const testing::QcowPart ours = testing::QcowPartOf(Slurp(c.dir + "/stdout"), Slurp(c.dir + "/stderr"), json);
    const bool same_out = theirs.out == ours.out, same_err = theirs.err == ours.err;
    CHECK_MESSAGE(same_out, c.name << ": qemu-img's stdout (`" << cmd << "`) is not ours\n"
                                   << Diff(theirs.out, ours.out));
    CHECK_MESSAGE(same_err, c.name << ": qemu-img's stderr (`" << cmd << "`) is not ours\n"
                                   << Diff(theirs.err, ours.err));
    const int want_exit = testing::ExpectedCheckExit(q.exit_code, ours);
    CHECK_MESSAGE(std::to_string(want_exit) + "\n" == Slurp(c.dir + "/exit"),
                  c.name << ": qemu-img exits " << q.exit_code << ", ours " << Trim(Slurp(c.dir + "/exit")));
    ++compared;
  }
  CHECK(compared >= 8);
}

// Every fixture is used by some case, so none rots unnoticed.
TEST_CASE("golden: every fixture is used") {
  std::map<std::string, int> used;
  for (const Case& c : Cases())
    used[fs::exists(c.dir + "/setup") ? Trim(Slurp(c.dir + "/setup")) : "none"]++;
  // Not a structured binding: clang 14 (the sanitizer build) cannot capture one in CHECK_MESSAGE's lambda.
  for (const auto& fixture : kFixtures) {
    const std::string& name = fixture.first;
    CHECK_MESSAGE(used[name] > 0, "fixture '" << name << "' is unused");
  }
}
