// Hostile images: a corpus (tests/hostile/make_hostile.py, generated at test
// time) of qcow2 files patched the way QEMU's iotests 060 and 080 attack an
// image (overlapping metadata, offsets beyond the end of the file or
// misaligned, huge counts, bad compressed descriptors, backing loops) plus
// our own dedup extension lying with its autoclear bit set.
//
// Every subcommand runs on every file under `timeout 20` and `ulimit -v`
// (in an ASan build, ASan's allocation cap instead: support/sanitizers.h):
// no signal, no timeout; either success with a correct result (judged by
// qemu-img) or failure with exactly one stderr line "qcow2dedup: ...".
// Read-only subcommands leave the file byte for byte as it was; check prints
// what qemu-img check prints, for the qcow2 part, on both streams. Where only
// our index lies, reading must still give qemu-img's view of the data and a
// write of data stored elsewhere in the image must give the right data.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "support/check_output.h"
#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/sanitizers.h"
#include "support/temp_dir.h"

using testing::Run;
using testing::RunResult;
using testing::Sh;
using testing::TempDir;
using testing::Tool;
namespace fs = std::filesystem;

namespace {

// Memory: `ulimit -v` (in an ASan build, ASan's cap on one allocation:
// support/sanitizers.h).
RunResult Limited(const std::string& cmd) { return Run(testing::MemoryLimitPrefix(2000000) + "timeout 20 " + cmd); }

// qemu-img check of the image alone: backing files (loops, missing ones)
// play no part in the consistency of the file itself.
RunResult QemuCheck(const std::string& path) {
  nlohmann::json spec = {{"driver", "qcow2"},
                         {"backing", nullptr},
                         {"file", {{"driver", "file"}, {"filename", path}}}};
  return Run("timeout 20 qemu-img check " + Sh("json:" + spec.dump()));
}

int Lines(const std::string& s) {
  if (s.empty()) return 0;
  int n = 0;
  for (char c : s) n += c == '\n';
  return s.back() == '\n' ? n : n + 1;
}

bool Exists(const std::string& p) {
  std::error_code ec;
  return fs::exists(fs::symlink_status(p, ec));
}

std::string Slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Compares two files a chunk at a time; a description of the first
// difference, or "" if they are equal.
std::string Difference(const std::string& a, const std::string& b) {
  std::error_code ec1, ec2;
  const uint64_t sa = fs::file_size(a, ec1), sb = fs::file_size(b, ec2);
  if (ec1 || ec2) return "cannot stat " + a + " or " + b;
  if (sa != sb) return "sizes differ: " + std::to_string(sa) + " vs " + std::to_string(sb);
  std::ifstream fa(a, std::ios::binary), fb(b, std::ios::binary);
  std::vector<char> ba(1 << 20), bb(1 << 20);
  for (uint64_t pos = 0; pos < sa;) {
    const size_t n = size_t(std::min<uint64_t>(ba.size(), sa - pos));
    fa.read(ba.data(), std::streamsize(n));
    fb.read(bb.data(), std::streamsize(n));
    if (!fa || !fb) return "read failed";
    if (std::memcmp(ba.data(), bb.data(), n) != 0) {
      size_t i = 0;
      while (ba[i] == bb[i]) ++i;
      return "first difference at byte " + std::to_string(pos + i);
    }
    pos += n;
  }
  return "";
}

struct Entry {
  std::string file, what, group, write_input;
  uint64_t write_offset = 0;
};

// What qemu-img makes of a file, before anything of ours touches it.
struct QemuView {
  bool readable = false;  // qemu-img convert -O raw succeeded
  std::string raw;        // its output
  int check = -1;         // qemu-img check's exit code, the file taken as qcow2
  int check_exit = -1;    // and as qemu-img takes it, with its output
  std::string check_out, check_err;
};

class Harness {
 public:
  Harness(std::string corpus, std::string work) : corpus_(std::move(corpus)), work_(std::move(work)) {}

  void Run(const Entry& e) {
    const std::string img = corpus_ + "/" + e.file;
    const std::string label = e.file + " (" + e.what + ")";
    const std::string before = Slurp(img);
    // With a backing file (loops, missing) qemu-img's view is no judge.
    QemuView q = Judge(img, e.file, e.group != "backing");
    const bool index_only = e.group == "index";

    // info, info --output=json, dedup-stats, dedup-stats --simulate, check:
    // read-only, so the file must not change.
    auto read_only = [&](const std::string& name, const std::string& args, bool is_check) {
      RunResult r = Limited(Tool() + " " + args);
      ++runs_;
      Verdict(label, name, r, is_check);
      CHECK_MESSAGE(Slurp(img) == before, label, ": `", name, "` changed the file");
      if (index_only)
        CHECK_MESSAGE((r.exit_code == 0 || (is_check && (r.exit_code == 2 || r.exit_code == 3))), label, ": `",
                      name, "` failed on an image where only the dedup index lies: ", r.err);
      return r;
    };
    read_only("info", "info " + Sh(img), false);
    RunResult ij = read_only("info --output=json", "info --output=json " + Sh(img), false);
    if (ij.exit_code == 0)
      CHECK_MESSAGE(!nlohmann::json::parse(ij.out, nullptr, false).is_discarded(), label,
                    ": info --output=json printed no JSON: ", ij.out);
    read_only("dedup-stats", "dedup-stats " + Sh(img), false);
    read_only("dedup-stats --simulate", "dedup-stats --simulate " + Sh(img), false);
    RunResult chk = read_only("check", "check " + Sh(img), true);
    if (chk.exit_code == 0 && (q.check == 2 || q.check == 3))
      CHECK_MESSAGE(false, label, ": check found nothing, qemu-img check exits ", q.check);
    // qemu-img is the judge of the qcow2 part of check's output: stdout,
    // stderr and exit code each (support/check_output.h).
    {
      const testing::QcowPart ours = testing::QcowPartOf(chk.out, chk.err, false);
      const testing::QcowPart theirs = testing::QcowPartOf(q.check_out, q.check_err, false);
      ++compared_;
      const bool same_out = ours.out == theirs.out, same_err = ours.err == theirs.err;
      CHECK_MESSAGE(same_out, label, ": check's stdout is not qemu-img check's\n--- qemu-img:\n", theirs.out,
                    "--- ours:\n", ours.out);
      CHECK_MESSAGE(same_err, label, ": check's stderr is not qemu-img check's\n--- qemu-img:\n",
                    theirs.err.substr(0, 4000), "--- ours:\n", ours.err.substr(0, 4000));
      const int want = testing::ExpectedCheckExit(q.check_exit, ours);
      CHECK_MESSAGE(chk.exit_code == want, label, ": check exits ", chk.exit_code, ", qemu-img check ",
                    q.check_exit);
      if (same_out && same_err && chk.exit_code == want) ++matched_;
    }

    // convert -O raw: qemu-img's view of the data, or a clean failure that
    // leaves no destination behind.
    {
      const std::string out = work_ + "/out.raw";
      fs::remove(out);
      RunResult r = Limited(Tool() + " convert -O raw " + Sh(img) + " " + Sh(out));
      ++runs_;
      Verdict(label, "convert -O raw", r, false);
      CHECK_MESSAGE(Slurp(img) == before, label, ": `convert -O raw` changed its source");
      if (r.exit_code == 0 && q.readable) {
        std::string d = Difference(out, q.raw);
        CHECK_MESSAGE(d.empty(), label, ": convert -O raw differs from qemu-img's view: ", d);
      }
      if (r.exit_code != 0) CHECK_MESSAGE(!Exists(out), label, ": a failed convert -O raw left ", out);
      if (index_only) CHECK_MESSAGE(r.exit_code == 0, label, ": convert -O raw failed: ", r.err);
      fs::remove(out);
    }
    // convert -O qcow2: an image qemu-img finds clean holding the same data.
    {
      const std::string out = work_ + "/out.qcow2";
      fs::remove(out);
      RunResult r = Limited(Tool() + " convert -O qcow2 " + Sh(img) + " " + Sh(out));
      ++runs_;
      Verdict(label, "convert -O qcow2", r, false);
      CHECK_MESSAGE(Slurp(img) == before, label, ": `convert -O qcow2` changed its source");
      if (r.exit_code == 0) {
        RunResult c = QemuCheck(out);
        CHECK_MESSAGE(c.exit_code == 0, label, ": convert -O qcow2 made an image qemu-img check rejects: ", c.out,
                      c.err);
        if (q.readable) {
          RunResult cmp = ::testing::Run("timeout 20 qemu-img compare -f qcow2 -F raw " + Sh(out) + " " + Sh(q.raw));
          CHECK_MESSAGE(cmp.exit_code == 0, label, ": convert -O qcow2 differs from qemu-img's view: ", cmp.out,
                        cmp.err);
        }
      } else {
        CHECK_MESSAGE(!Exists(out), label, ": a failed convert -O qcow2 left ", out);
      }
      if (index_only) CHECK_MESSAGE(r.exit_code == 0, label, ": convert -O qcow2 failed: ", r.err);
      fs::remove(out);
    }
    // check -r all on a copy (next to the original: relative backing names
    // still resolve): if it says clean, qemu-img must agree.
    const std::string copy = img + ".work";
    {
      fs::copy_file(img, copy, fs::copy_options::overwrite_existing);
      RunResult r = Limited(Tool() + " check -r all " + Sh(copy));
      ++runs_;
      Verdict(label, "check -r all", r, true);
      if (r.exit_code == 0) {
        RunResult c = QemuCheck(copy);
        CHECK_MESSAGE(c.exit_code == 0, label, ": check -r all says clean, qemu-img check does not: ", c.out, c.err);
      }
      if (index_only) CHECK_MESSAGE(r.exit_code == 0, label, ": check -r all did not repair: ", r.out, r.err);
      // Could not check, and repaired nothing (as qemu-img does, a repair
      // may give up half way, exit 1, having said what it mended): then
      // nothing may have changed.
      const bool mended = r.err.find("\nRepairing ") != std::string::npos || r.err.rfind("Repairing ", 0) == 0 ||
                          r.err.find("Rebuilding refcount structure") != std::string::npos;
      if (r.exit_code == 1 && !mended)
        CHECK_MESSAGE(Slurp(copy) == before, label, ": check -r all failed, repaired nothing, but changed the file");
      fs::remove(copy);
    }
    // write on a copy: data stored elsewhere in the image, over other data.
    {
      fs::copy_file(img, copy, fs::copy_options::overwrite_existing);
      const std::string input = corpus_ + "/" + e.write_input;
      RunResult r = Limited(Tool() + " write --input " + Sh(input) + " " + Sh(copy) + " " +
                            std::to_string(e.write_offset));
      ++runs_;
      Verdict(label, "write", r, false);
      if (index_only) CHECK_MESSAGE(r.exit_code == 0, label, ": write failed: ", r.err);
      // A refused write leaves the file as it was.
      if (r.exit_code != 0) CHECK_MESSAGE(Slurp(copy) == before, label, ": write failed but changed the file");
      if (r.exit_code == 0) {
        if (q.check == 0) {
          RunResult c = QemuCheck(copy);
          CHECK_MESSAGE(c.exit_code == 0, label, ": after write qemu-img check fails: ", c.out, c.err);
        }
        if (q.readable) {
          // Expected: qemu-img's view before, with the input at the offset.
          std::string expect = Slurp(q.raw);
          const std::string in = Slurp(input);
          REQUIRE(e.write_offset + in.size() <= expect.size());
          expect.replace(e.write_offset, in.size(), in);
          const std::string want = work_ + "/want.raw", got = work_ + "/got.raw";
          std::ofstream(want, std::ios::binary) << expect;
          fs::remove(got);
          RunResult conv = ::testing::Run("timeout 20 qemu-img convert -f qcow2 -O raw " + Sh(copy) + " " + Sh(got));
          CHECK_MESSAGE(conv.exit_code == 0, label, ": after write qemu-img cannot read the image: ", conv.err);
          if (conv.exit_code == 0) {
            std::string d = Difference(got, want);
            CHECK_MESSAGE(d.empty(), label, ": after write the data is wrong (qemu-img's view): ", d);
          }
          fs::remove(want);
          fs::remove(got);
        }
      }
      fs::remove(copy);
    }
    if (q.readable) fs::remove(q.raw);
    ++files_;
  }

  uint64_t files() const { return files_; }
  uint64_t runs() const { return runs_; }
  uint64_t compared() const { return compared_; }
  uint64_t matched() const { return matched_; }

 private:
  QemuView Judge(const std::string& img, const std::string& name, bool read_data) {
    QemuView q;
    q.raw = work_ + "/" + name + ".qemu.raw";
    fs::remove(q.raw);
    if (read_data) {
      RunResult c = ::testing::Run("timeout 20 qemu-img convert -f qcow2 -O raw " + Sh(img) + " " + Sh(q.raw));
      q.readable = c.exit_code == 0;
    }
    if (!q.readable) fs::remove(q.raw);
    q.check = QemuCheck(img).exit_code;
    // check's output is compared with qemu-img check's on the file as
    // qemu-img takes it (what it does not take for qcow2 has no checks, as
    // for us); with a backing file, on the image alone.
    const RunResult c = read_data ? ::testing::Run("timeout 20 qemu-img check " + Sh(img)) : QemuCheck(img);
    q.check_exit = c.exit_code;
    q.check_out = c.out;
    q.check_err = c.err;
    return q;
  }

  // No crash, no timeout; success, or one line of error. A check prints
  // its findings on stderr, one a line, as qemu-img check does: one that
  // ran to its end (exit 2 or 3) nothing else there, one that could not
  // complete (exit 1) its one line of error last.
  static void Verdict(const std::string& label, const std::string& cmd, const RunResult& r, bool is_check) {
    INFO(label << ": `" << cmd << "` exit " << r.exit_code << "\nstdout: " << r.out.substr(0, 2000)
               << "\nstderr: " << r.err.substr(0, 2000));
    CHECK_MESSAGE(r.exit_code != 124, "timed out");
    CHECK_MESSAGE(r.exit_code < 124, "killed by a signal or could not run");
    if (r.exit_code == 0 || r.exit_code == 124) return;
    if (is_check && (r.exit_code == 2 || r.exit_code == 3)) {
      CHECK_MESSAGE(r.err.find("qcow2dedup:") == std::string::npos, "a check that ran to its end failed nothing");
      return;
    }
    std::string last = r.err;
    if (is_check) {
      const size_t at = r.err.rfind('\n', r.err.size() >= 2 ? r.err.size() - 2 : 0);
      last = at == std::string::npos ? r.err : r.err.substr(at + 1);
      CHECK_MESSAGE(r.err.find("qcow2dedup:") == r.err.size() - last.size(), "one line of error, and that last");
    }
    CHECK_MESSAGE(Lines(last) == 1, "a failure must print exactly one line of error on stderr");
    CHECK_MESSAGE(last.rfind("qcow2dedup:", 0) == 0, "a failure's line must start with \"qcow2dedup:\"");
  }

  std::string corpus_, work_;
  uint64_t files_ = 0, runs_ = 0, compared_ = 0, matched_ = 0;
};

}  // namespace

TEST_CASE("hostile images: every subcommand fails cleanly or answers right, and reading changes nothing") {
  REQUIRE_MESSAGE(testing::HaveCommand("qemu-img"), "qemu-img is needed as the judge");
  REQUIRE_MESSAGE(testing::HaveCommand("qemu-io"), "qemu-io is needed to build the corpus");
  REQUIRE_MESSAGE(testing::HaveCommand("python3"), "python3 is needed to build the corpus");
  TempDir dir;
  const std::string corpus = dir / "corpus", work = dir / "work";
  fs::create_directories(work);
  RunResult gen = Run("python3 " + Sh(std::string(QCOW2DEDUP_SOURCE_DIR) + "/tests/hostile/make_hostile.py") + " " +
                      Sh(corpus) + " --tool " + Tool());
  REQUIRE_MESSAGE(gen.exit_code == 0, "make_hostile.py failed:\n", gen.out, gen.err);

  nlohmann::json manifest = nlohmann::json::parse(Slurp(corpus + "/manifest.json"), nullptr, false);
  REQUIRE(manifest.is_array());
  std::vector<Entry> entries;
  for (const auto& j : manifest)
    entries.push_back({j["file"], j["what"], j["group"], j["write_input"], j["write_offset"].get<uint64_t>()});
  CHECK(entries.size() >= 40);

  Harness h(corpus, work);
  for (const Entry& e : entries) h.Run(e);
  MESSAGE("hostile corpus: ", h.files(), " files, ", h.runs(), " subcommand runs");
  std::cout << "hostile corpus: " << h.files() << " files, " << h.runs() << " subcommand runs; check's output "
            << h.matched() << " of " << h.compared() << " times the same as qemu-img check's\n";
  CHECK(h.compared() == entries.size());
}
