// convert -c: every distinct cluster stored once, compressed, on real disk
// data (a slice of the corpus' vm-a.raw, twice over, so that half of it is
// duplicates), at 4K and 64K clusters, with zlib and zstd. Judged by
// qemu-img (compare, check, info), qemu-io (overwrites of shared compressed
// clusters, read back), the independent layout reader (refcounts as
// qemu-img counts them) and the dedup oracle (distinct clusters stored).
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

constexpr uint64_t kSliceMiB = 40;

bool IsFile(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string CorpusDisk() {
  const char* env = std::getenv("QCOW2DEDUP_CORPUS");
  REQUIRE_MESSAGE((env && *env), "QCOW2DEDUP_CORPUS is not set: point it at the directory that "
                                 "../shared/corpus/make-corpus.sh built (it holds vm-a.raw)");
  const std::string disk = std::string(env) + "/vm-a.raw";
  REQUIRE_MESSAGE(IsFile(disk), disk << " is missing: build the corpus with ../shared/corpus/make-corpus.sh");
  return disk;
}

void Sh0(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\nstdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
}

// The first kSliceMiB of the disk (where its file system's busy start is),
// then the same again: every cluster of the second half repeats one of the
// first.
std::string MakeInput(const TempDir& dir) {
  const std::string disk = CorpusDisk();
  const std::string raw = dir / "input.raw";
  Sh0(fmt::format("dd if={} of={} bs=1M count={} status=none && dd if={} of={} bs=1M count={} seek={} "
                  "conv=notrunc status=none",
                  Sh(disk), Sh(raw), kSliceMiB, Sh(disk), Sh(raw), kSliceMiB, kSliceMiB));
  return raw;
}

uint64_t OracleUnique(const std::string& raw, uint64_t cs) {
  const std::string oracle = QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py";
  REQUIRE_MESSAGE(IsFile(oracle), "the dedup oracle is missing: " << oracle);
  RequireCommand("python3");
  RunResult r = Run("python3 " + Sh(oracle) + " " + Sh(raw) + " " + std::to_string(cs));
  REQUIRE(r.exit_code == 0);
  return nlohmann::json::parse(r.out)["unique"].get<uint64_t>();
}

// Distinct stored clusters by the L2 tables: compressed descriptors and
// uncompressed host clusters.
struct Stored {
  uint64_t compressed = 0, plain = 0;
  uint64_t total() const { return compressed + plain; }
};
Stored CountStored(const Qcow2Layout& l) {
  std::set<uint64_t> comp, plain;
  for (uint64_t e : l.l2_entries) {
    if (e & Qcow2Layout::kCompressed) comp.insert(e & ~Qcow2Layout::kCopied);
    else if ((e & Qcow2Layout::kOffsetMask) && !(e & Qcow2Layout::kZero)) plain.insert(e & Qcow2Layout::kOffsetMask);
  }
  return {comp.size(), plain.size()};
}

Qcow2Layout Layout(const std::string& path) {
  std::string err;
  auto l = ReadQcow2Layout(path, &err);
  REQUIRE_MESSAGE(l, err);
  return *l;
}

// Both checks clean, refcounts as the layout reader counts them.
void BothClean(const std::string& img) {
  CheckQemuClean(img);
  RunResult ours = Run(Tool() + " check " + Sh(img));
  INFO("our check: " << ours.out << ours.err);
  CHECK(ours.exit_code == 0);
  const Qcow2Layout l = Layout(img);
  CHECK_MESSAGE(l.refcount_mismatches == 0, (l.problems.empty() ? "" : l.problems[0]));
  CHECK(l.copied_mismatches == 0);
}

// Guest cluster numbers of the first half whose L2 entry another guest
// cluster (its repeat in the second half) shares, compressed.
std::vector<uint64_t> SharedCompressed(const Qcow2Layout& l, uint64_t cs) {
  const uint64_t half = kSliceMiB * (1u << 20) / cs;
  std::vector<uint64_t> out;
  for (uint64_t g = 0; g < half; ++g)
    if ((l.l2_entries[g] & Qcow2Layout::kCompressed) && l.l2_entries[g] == l.l2_entries[g + half]) out.push_back(g);
  return out;
}

// Writes bytes of value v over [off, off + len) of the raw file (the
// expected guest view after the same write to the image).
void Poke(const std::string& raw, uint64_t off, uint64_t len, int v) {
  Sh0(fmt::format("python3 -c \"import sys; f=open(sys.argv[1],'r+b'); f.seek({}); f.write(bytes([{}])*{})\" {}",
                  off, v, len, Sh(raw)));
}

}  // namespace

TEST_CASE("convert -c: dedup and compression in one image that QEMU reads, checks and writes") {
  RequireCommand("qemu-img");
  RequireCommand("qemu-io");
  TempDir dir;
  const std::string input = MakeInput(dir);
  for (uint64_t cs : {uint64_t(4096), uint64_t(65536)}) {
    const uint64_t unique = OracleUnique(input, cs);
    for (std::string type : {"zlib", "zstd"}) {
      CAPTURE(cs);
      CAPTURE(type);
      const std::string img = dir / fmt::format("c{}-{}.qcow2", cs, type);
      Sh0(fmt::format("{} convert --force -c -o cluster_size={},compression_type={} {} {}", Tool(), cs, type,
                      Sh(input), Sh(img)));
      // The header as qemu-img writes it for this compression type.
      nlohmann::json info = QemuImgInfo(img);
      REQUIRE(info.is_object());
      CHECK(info["format-specific"]["data"]["compression-type"] == type);
      const std::string ref = dir / "ref.qcow2";
      Sh0(fmt::format("qemu-img create -q -f qcow2 -o cluster_size={},compression_type={} {} 1G", cs, type, Sh(ref)));
      const Qcow2Layout ours = Layout(img), theirs = Layout(ref);
      CHECK(ours.incompatible == theirs.incompatible);
      const std::string head = ReadFileBytes(img).substr(0, 112), ref_head = ReadFileBytes(ref).substr(0, 112);
      CHECK(head.substr(100, 4) == ref_head.substr(100, 4));  // header length
      CHECK(head[104] == ref_head[104]);                      // compression type

      CheckQemuIdentical(img, input);
      BothClean(img);
      // Every distinct non-zero cluster stored once, nearly all compressed.
      Stored stored = CountStored(ours);
      CHECK(stored.total() == unique);
      CHECK(stored.compressed > stored.plain);
      QemuCheckResult qc = QemuImgCheck(img);
      CHECK(qc.Get("compressed-clusters") > 0);
      // Smaller than the same data deduplicated without compression.
      const std::string plain_img = dir / "plain.qcow2";
      Sh0(fmt::format("{} convert --force -o cluster_size={} {} {}", Tool(), cs, Sh(input), Sh(plain_img)));
      CHECK(FileSize(img) < FileSize(plain_img));

      // qemu-io overwrites one guest cluster of a shared compressed pair
      // whole, and part of another: QEMU copies on write, the twin keeps its
      // data, both checks stay clean.
      const std::vector<uint64_t> shared = SharedCompressed(ours, cs);
      REQUIRE(shared.size() >= 2);
      const std::string expect = dir / "expect.raw";
      Sh0("cp --sparse=always " + Sh(input) + " " + Sh(expect));
      const uint64_t g1 = shared[0] * cs, g2 = shared[shared.size() / 2] * cs + 512;
      Sh0(fmt::format("qemu-io -f qcow2 -c 'write -P 0xab {} {}' -c 'write -P 0x5c {} 1024' {}", g1, cs, g2,
                      Sh(img)));
      Poke(expect, g1, cs, 0xab);
      Poke(expect, g2, 1024, 0x5c);
      Sh0(fmt::format("qemu-io -f qcow2 -c 'read -P 0xab {} {}' -c 'read -P 0x5c {} 1024' {}", g1, cs, g2, Sh(img)));
      CheckQemuIdentical(img, expect);
      BothClean(img);

      // Our write into the compressed image: new data, and a cluster that
      // repeats stored data (linked to the compressed copy, not stored
      // again), over a compressed cluster that another guest cluster shares.
      const uint64_t g3 = shared[1] * cs, g4 = shared.back() * cs;
      const std::string blob = dir / "blob.bin";
      Sh0(fmt::format("dd if={} of={} bs={} skip={} count=1 status=none", Sh(input), Sh(blob), cs, shared[2]));
      Sh0(fmt::format("{} write --pattern 0xcd --length {} {} {}", Tool(), cs, Sh(img), g3));
      Sh0(fmt::format("{} write --input {} {} {}", Tool(), Sh(blob), Sh(img), g4));
      Poke(expect, g3, cs, 0xcd);
      Sh0(fmt::format("dd if={} of={} bs={} seek={} conv=notrunc status=none", Sh(blob), Sh(expect), cs,
                      shared.back()));
      CheckQemuIdentical(img, expect);
      BothClean(img);
      const Qcow2Layout after = Layout(img);
      CHECK(after.l2_entries[shared.back()] == after.l2_entries[shared[2]]);
      CHECK((after.l2_entries[shared.back()] & Qcow2Layout::kCompressed) != 0);
      // And QEMU reads our last write back.
      Sh0(fmt::format("qemu-io -f qcow2 -c 'read -P 0xcd {} {}' {}", g3, cs, Sh(img)));
    }
  }
}

TEST_CASE("convert -c: data that does not compress is stored as it is, still once") {
  RequireCommand("qemu-img");
  TempDir dir;
  const std::string raw = dir / "noise.raw";
  // 2 MiB of noise, then the same 2 MiB again, then 1 MiB of text.
  Sh0(fmt::format("head -c 2097152 /dev/urandom >{} && cat {} {} >{}.2 && mv {}.2 {} && "
                  "yes abcdefghijklmno | head -c 1048576 >>{}",
                  Sh(raw), Sh(raw), Sh(raw), Sh(raw), Sh(raw), Sh(raw), Sh(raw)));
  for (std::string type : {"zlib", "zstd"}) {
    CAPTURE(type);
    const std::string img = dir / (type + ".qcow2");
    Sh0(fmt::format("{} convert --force -c -o cluster_size=65536,compression_type={} {} {}", Tool(), type, Sh(raw),
                    Sh(img)));
    CheckQemuIdentical(img, raw);
    BothClean(img);
    const Stored s = CountStored(Layout(img));
    CHECK(s.plain == 32);       // the noise, once
    CHECK(s.compressed == 1);   // the text repeats itself cluster after cluster
    CHECK(s.total() == OracleUnique(raw, 65536));
  }
}

TEST_CASE("convert -c with -O raw is refused in one line") {
  TempDir dir;
  Sh0("head -c 65536 /dev/zero >" + Sh(dir / "a.raw"));
  RunResult r = Run(Tool() + " convert -c -O raw " + Sh(dir / "a.raw") + " " + Sh(dir / "b.raw"));
  CHECK(r.exit_code == 1);
  CHECK(LineCount(r.err) == 1);
  CHECK(r.err.find("-c") != std::string::npos);
}

TEST_CASE("dedup in place of an image qemu-img convert -c wrote: compressed duplicates linked to one copy") {
  RequireCommand("qemu-img");
  TempDir dir;
  const std::string input = MakeInput(dir);
  const uint64_t cs = 65536;
  const uint64_t unique = OracleUnique(input, cs);
  for (std::string type : {"zlib", "zstd"}) {
    CAPTURE(type);
    const std::string img = dir / (type + ".qcow2");
    Sh0(fmt::format("qemu-img convert -c -O qcow2 -o cluster_size={},compression_type={} {} {}", cs, type,
                    Sh(input), Sh(img)));
    const Stored before = CountStored(Layout(img));
    REQUIRE(before.total() > unique);  // qemu-img stores every cluster apart
    RunResult r = Run(Tool() + " dedup --output=json " + Sh(img));
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    const nlohmann::json j = nlohmann::json::parse(r.out);
    const Stored after = CountStored(Layout(img));
    CHECK(after.total() == unique);
    CHECK(after.compressed > 0);
    CHECK(j["stored-clusters-after"].get<uint64_t>() == unique);
    CHECK(j["relinked-clusters"].get<uint64_t>() > 0);
    CheckQemuIdentical(img, input);
    BothClean(img);
  }
}

TEST_CASE("convert -n -c into images qemu-img made: extended L2 entries, zstd") {
  RequireCommand("qemu-img");
  TempDir dir;
  const std::string raw = dir / "in.raw";
  // Text clusters, each distinct, then the same again: half of them shared.
  Sh0(fmt::format("python3 -c \"import sys; sys.stdout.buffer.write(b''.join((b'cluster %07d\\n' % i) * 4096 "
                  "for i in range(32)))\" >{} && cat {} {} >{}.2 && mv {}.2 {}",
                  Sh(raw), Sh(raw), Sh(raw), Sh(raw), Sh(raw), Sh(raw)));
  for (std::string opts : {"extended_l2=on", "compression_type=zstd"}) {
    CAPTURE(opts);
    const std::string img = dir / "t.qcow2";
    Sh0(fmt::format("rm -f {} && qemu-img create -q -f qcow2 -o cluster_size=65536,{} {} {}", Sh(img), opts, Sh(img),
                    FileSize(raw)));
    Sh0(fmt::format("{} convert -n -c {} {}", Tool(), Sh(raw), Sh(img)));
    CheckQemuIdentical(img, raw);
    CheckQemuClean(img);
    RunResult ours = Run(Tool() + " check " + Sh(img));
    INFO(ours.out << ours.err);
    CHECK(ours.exit_code == 0);
    QemuCheckResult qc = QemuImgCheck(img);
    CHECK(qc.Get("compressed-clusters") == 64);  // every guest cluster, 32 stored
  }
}
