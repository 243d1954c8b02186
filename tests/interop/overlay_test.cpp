// Fleets: dedup overlays on a shared base (convert -B, create -b), on the
// real corpus that shared/corpus/make-corpus.sh builds: part-a.img is the
// template (the base), part-a2.img a clone of it that lived a little and
// part-b.img the same Debian with more packages (700 MiB ext4 images). An overlay made by
// `convert -B part-a.img` must pass qemu-img check, read exactly as its
// source for qemu-img compare, leave unallocated exactly the clusters that
// equal the base at the same offset, zero-flag exactly the zero clusters
// over base data, and store exactly the distinct clusters the independent
// oracle counts in what differs from the base. qemu-img rebase -b "" and
// qemu-img commit then work on such overlays.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

constexpr uint64_t kCluster = 64 << 10;

bool IsFile(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string Corpus() {
  const char* env = std::getenv("QCOW2DEDUP_CORPUS");
  REQUIRE_MESSAGE((env && *env), "QCOW2DEDUP_CORPUS is not set: point it at the directory that "
                                 "../shared/corpus/make-corpus.sh built");
  const std::string dir = env;
  for (const char* name : {"part-a.img", "part-a2.img", "part-b.img"})
    REQUIRE_MESSAGE(IsFile(dir + "/" + name), dir << " has no " << name << ": rebuild the corpus with "
                                                  << "../shared/corpus/make-corpus.sh " << dir);
  return dir;
}

RunResult MustRun(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  return r;
}

bool IsZero(const std::vector<uint8_t>& b) {
  for (uint8_t x : b)
    if (x) return false;
  return true;
}

// What an overlay of src on base must hold, worked out here from the bytes
// (sharing no code with the library). `masked` gets src with every cluster
// that equals the base zeroed (a sparse file): what the oracle counts.
struct Difference {
  uint64_t clusters = 0;
  uint64_t same = 0;            // equal to the base: unallocated
  uint64_t zero_over_data = 0;  // zero where the base is not: zero flag
  uint64_t data = 0;            // the rest: stored (deduplicated)
};

Difference Diff(const std::string& src, const std::string& base, const std::string& masked) {
  const int s = ::open(src.c_str(), O_RDONLY), b = ::open(base.c_str(), O_RDONLY);
  const int m = ::open(masked.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  REQUIRE((s >= 0 && b >= 0 && m >= 0));
  const uint64_t size = FileSize(src), base_size = FileSize(base);
  std::vector<uint8_t> sb(kCluster), bb(kCluster);
  Difference d;
  for (uint64_t off = 0; off < size; off += kCluster) {
    std::fill(sb.begin(), sb.end(), 0);
    std::fill(bb.begin(), bb.end(), 0);
    const uint64_t n = std::min(kCluster, size - off);
    REQUIRE(::pread(s, sb.data(), n, off) == ssize_t(n));
    if (off < base_size) {
      const uint64_t bn = std::min(kCluster, base_size - off);
      REQUIRE(::pread(b, bb.data(), bn, off) == ssize_t(bn));
    }
    ++d.clusters;
    if (sb == bb) {
      ++d.same;
    } else if (IsZero(sb)) {
      ++d.zero_over_data;
    } else {
      ++d.data;
      REQUIRE(::pwrite(m, sb.data(), n, off) == ssize_t(n));
    }
  }
  REQUIRE(::ftruncate(m, off_t(size)) == 0);
  ::close(s), ::close(b), ::close(m);
  return d;
}

nlohmann::json Oracle(const std::string& raw) {
  const std::string oracle = QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py";
  REQUIRE_MESSAGE(IsFile(oracle), "the dedup oracle is missing: " << oracle);
  RunResult r = MustRun("python3 " + Sh(oracle) + " " + Sh(raw) + " " + std::to_string(kCluster));
  return nlohmann::json::parse(r.out);
}

// Checks the overlay at `overlay` of `src` on `base` from every side.
Difference CheckOverlay(const std::string& overlay, const std::string& src, const std::string& base,
                  const std::string& masked) {
  CheckQemuClean(overlay);
  CheckQemuIdentical(overlay, src);
  const Difference d = Diff(src, base, masked);
  const nlohmann::json want = Oracle(masked);
  std::string err;
  auto layout = ReadQcow2Layout(overlay, &err);
  REQUIRE_MESSAGE(layout.has_value(), err);
  const Qcow2Layout& l = *layout;
  uint64_t unallocated = 0, zero_flagged = 0;
  for (uint64_t g = 0; g < d.clusters; ++g) {
    if (l.IsUnallocated(g)) ++unallocated;
    else if (l.IsZeroFlagged(g)) ++zero_flagged;
  }
  CHECK(l.refcount_mismatches == 0);
  CHECK(l.copied_mismatches == 0);
  CHECK(unallocated == d.same);
  CHECK(zero_flagged == d.zero_over_data);
  CHECK(l.data_references() == d.data);
  CHECK(want["nonzero"].get<uint64_t>() == d.data);
  CHECK(l.stored_data_clusters() == want["unique"].get<uint64_t>());
  MESSAGE(src << ": " << d.clusters << " clusters, " << d.same << " as in the base, " << d.zero_over_data
              << " zeroed, " << d.data << " differing; stored " << l.stored_data_clusters() << " (oracle "
              << want["unique"].get<uint64_t>() << "), file " << FileSize(overlay) << " bytes");
  return d;
}

}  // namespace

TEST_CASE("convert -B: overlays of corpus VMs on their template, relative base name, qemu-img rebase") {
  REQUIRE(HaveCommand("qemu-img"));
  REQUIRE(HaveCommand("python3"));
  const std::string corpus = Corpus();
  TempDir dir;
  // The base by a relative name from the overlay's directory, as qemu-img
  // stores and resolves it.
  REQUIRE(::symlink((corpus + "/part-a.img").c_str(), (dir / "base.img").c_str()) == 0);
  REQUIRE(::mkdir((dir / "vms").c_str(), 0755) == 0);
  const std::string vm = "part-b";
  const std::string src = corpus + "/" + vm + ".img", overlay = dir / ("vms/" + vm + ".qcow2");
  MustRun("cd " + Sh(dir.path()) + " && " + Tool() + " convert -B ../base.img -F raw " + Sh(src) + " vms/" + vm +
          ".qcow2");
  nlohmann::json info = QemuImgInfo(overlay);
  REQUIRE(info.is_object());
  CHECK(info["backing-filename"] == "../base.img");
  CHECK(info["backing-filename-format"] == "raw");
  CHECK(info["virtual-size"] == FileSize(src));
  const Difference d = CheckOverlay(overlay, src, corpus + "/part-a.img", dir / "masked.raw");
  // part-b shares about half of the template, at the same offsets.
  CHECK(d.same > d.clusters / 4);
  CHECK(d.data > 1000);
  ::unlink((dir / "masked.raw").c_str());

  // QEMU pulls the base into the overlay (safe mode: it reads both).
  MustRun("qemu-img rebase -f qcow2 -b '' " + Sh(overlay));
  info = QemuImgInfo(overlay);
  REQUIRE(info.is_object());
  CHECK_FALSE(info.contains("backing-filename"));
  CheckQemuClean(overlay);
  CheckQemuIdentical(overlay, src);
}

TEST_CASE("convert -B then qemu-img commit into a copy of the base") {
  REQUIRE(HaveCommand("qemu-img"));
  REQUIRE(HaveCommand("python3"));
  const std::string corpus = Corpus();
  TempDir dir;
  const std::string src = corpus + "/part-a2.img", base = dir / "base.img", overlay = dir / "a2.qcow2";
  MustRun("cp --sparse=always " + Sh(corpus + "/part-a.img") + " " + Sh(base));
  MustRun("cd " + Sh(dir.path()) + " && " + Tool() + " convert -B base.img -F raw " + Sh(src) + " a2.qcow2");
  nlohmann::json info = QemuImgInfo(overlay);
  REQUIRE(info.is_object());
  CHECK(info["backing-filename"] == "base.img");
  const Difference d = CheckOverlay(overlay, src, base, dir / "masked.raw");
  // part-a2 is the template with a few changes.
  CHECK(d.same > d.clusters * 9 / 10);
  CHECK(d.data > 50);
  ::unlink((dir / "masked.raw").c_str());

  MustRun("qemu-img commit -f qcow2 " + Sh(overlay));
  RunResult r = Run("qemu-img compare -f raw -F raw " + Sh(base) + " " + Sh(src));
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CheckQemuClean(overlay);
  CheckQemuIdentical(overlay, src);
}

TEST_CASE("convert -B: each kind of cluster, on a raw base with data, allocated zeros and a hole") {
  REQUIRE(HaveCommand("qemu-img"));
  REQUIRE(HaveCommand("qemu-io"));
  REQUIRE(HaveCommand("python3"));
  TempDir dir;
  const std::string base = dir / "base.raw", src = dir / "src.raw", overlay = dir / "top.qcow2";
  // base: 4 MiB of random data, 2 MiB of written zeros, a 2 MiB hole.
  MustRun("head -c 4M /dev/urandom >" + Sh(base) + " && head -c 2M /dev/zero >>" + Sh(base) + " && truncate -s 8M " +
          Sh(base));
  // src, 10 MiB: the base with cluster 0 zeroed (zero flag), cluster 5 and
  // 70 (over written zeros) the same new data (stored once), cluster 100
  // (over the hole) base cluster 3's data, 9M past the base's end new data,
  // and a hole at 5M over the base's written zeros (the same: unallocated,
  // not zero flagged).
  MustRun("cp " + Sh(base) + " " + Sh(src) + " && truncate -s 10M " + Sh(src) + " && head -c 64K /dev/urandom >" +
          Sh(dir / "r.bin") + " && head -c 64K /dev/urandom >" + Sh(dir / "s.bin"));
  MustRun("qemu-io -f raw -c 'write -z 0 64K' " + Sh(src) + " >/dev/null && dd if=" + Sh(dir / "r.bin") + " of=" +
          Sh(src) + " bs=64K seek=5 conv=notrunc status=none && dd if=" + Sh(dir / "r.bin") + " of=" + Sh(src) +
          " bs=64K seek=70 conv=notrunc status=none && dd if=" + Sh(base) + " of=" + Sh(src) +
          " bs=64K skip=3 seek=100 count=1 conv=notrunc status=none && dd if=" + Sh(dir / "s.bin") + " of=" +
          Sh(src) + " bs=64K seek=144 conv=notrunc status=none");
  MustRun("fallocate -p -o 5M -l 512K " + Sh(src));
  MustRun(Tool() + " convert -B base.raw -F raw " + Sh(src) + " " + Sh(overlay));
  const Difference d = CheckOverlay(overlay, src, base, dir / "masked.raw");
  CHECK(d.clusters == 160);
  CHECK(d.zero_over_data == 1);
  CHECK(d.data == 4);
  CHECK(d.same == 155);
  std::string err;
  auto layout = ReadQcow2Layout(overlay, &err);
  REQUIRE_MESSAGE(layout.has_value(), err);
  CHECK(layout->stored_data_clusters() == 3);
  CHECK(layout->IsZeroFlagged(0));
  CHECK(layout->HostOffset(5) == layout->HostOffset(70));
}

TEST_CASE("create -b: an empty overlay reads as its base; writes go to the overlay, deduplicated") {
  REQUIRE(HaveCommand("qemu-img"));
  REQUIRE(HaveCommand("qemu-io"));
  TempDir dir;
  const std::string base = dir / "base.qcow2", overlay = dir / "top.qcow2", raw = dir / "want.raw";
  // A qcow2 base of 8 MiB with data in its first 4 MiB.
  MustRun("qemu-img create -q -f qcow2 " + Sh(base) + " 8M && qemu-io -f qcow2 -c 'write -P 0x5a 0 4M' " + Sh(base));
  MustRun("cd " + Sh(dir.path()) + " && " + Tool() + " create -q -b base.qcow2 -F qcow2 top.qcow2");
  nlohmann::json info = QemuImgInfo(overlay);
  REQUIRE(info.is_object());
  CHECK(info["virtual-size"] == 8 << 20);  // SIZE defaults to the base's
  CHECK(info["backing-filename"] == "base.qcow2");
  CHECK(info["backing-filename-format"] == "qcow2");
  CheckQemuClean(overlay);
  MustRun("qemu-img convert -f qcow2 -O raw " + Sh(base) + " " + Sh(raw));
  CheckQemuIdentical(overlay, raw);

  // The same 64 KiB twice, and zeros over base data: 1 cluster stored.
  const std::string data = dir / "data.bin";
  MustRun("head -c 65536 /dev/urandom >" + Sh(data));
  MustRun(Tool() + " write --input " + Sh(data) + " " + Sh(overlay) + " 1M");
  MustRun(Tool() + " write --input " + Sh(data) + " " + Sh(overlay) + " 6M");
  MustRun(Tool() + " write --pattern 0 --length 128K " + Sh(overlay) + " 2M");
  MustRun("dd if=" + Sh(data) + " of=" + Sh(raw) + " bs=64K seek=16 conv=notrunc status=none && dd if=" + Sh(data) +
          " of=" + Sh(raw) + " bs=64K seek=96 conv=notrunc status=none && dd if=/dev/zero of=" + Sh(raw) +
          " bs=64K seek=32 count=2 conv=notrunc status=none");
  CheckQemuClean(overlay);
  CheckQemuIdentical(overlay, raw);
  std::string err;
  auto layout = ReadQcow2Layout(overlay, &err);
  REQUIRE_MESSAGE(layout.has_value(), err);
  CHECK(layout->stored_data_clusters() == 1);
  CHECK(layout->data_references() == 2);
  CHECK(layout->IsZeroFlagged(32));
  CHECK(layout->IsZeroFlagged(33));
  // The base was only read.
  CheckQemuClean(base);
  RunResult r = Run("qemu-img compare -f qcow2 -F qcow2 " + Sh(base) + " " + Sh(overlay));
  CHECK(r.exit_code == 1);  // they differ now, as they must
}
