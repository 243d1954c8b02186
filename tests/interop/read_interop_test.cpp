// Reading images that stock QEMU wrote: for every qcow2 configuration QEMU
// can produce, `qcow2dedup convert -O raw` must give the bytes
// `qemu-img convert -O raw` gives, and `qcow2dedup info --output=json` must
// say what `qemu-img info --output=json` says. Neither may change the image.
#include <doctest/doctest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "support/process.h"
#include "support/qemu_images.h"
#include "support/temp_dir.h"

using namespace testing;
using namespace testing::images;

namespace {

constexpr uint64_t KiB = 1024, MiB = 1024 * 1024;
// Not a multiple of any cluster size: the last cluster is partial.
constexpr uint64_t kVirtualSize = 6 * MiB + 1536;

std::string N(uint64_t v) { return std::to_string(v); }
std::string Hex(int v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", v & 0xff);
  return buf;
}

// A scratch directory with a file of random bytes for `write -s`.
struct Scratch {
  TempDir dir;
  std::string rnd;
  Scratch() {
    rnd = dir / "random.bin";
    WriteBytes(rnd, RandomBytes(1 * MiB, 42));
  }
  std::string operator/(const std::string& name) const { return dir / name; }
};

// qemu-io commands that leave every kind of L2 entry behind: data of
// distinct patterns, random data, the same data twice, partial clusters,
// zero writes (with and without unmap), discards, a compressed cluster,
// subcluster-sized writes and a write ending at the last byte of the disk.
// shift moves the unaligned writes so that layers of a chain overlap
// partially; base varies the patterns between layers.
std::vector<std::string> Workload(const Scratch& s, uint64_t cluster_size, uint64_t vsize, int base,
                                  uint64_t shift = 0, bool compressed_write = true) {
  const uint64_t cs = cluster_size;
  const uint64_t sub = std::max<uint64_t>(512, cs / 32);
  std::vector<std::string> c = {
      "write -q -P " + Hex(base + 1) + " " + N(shift) + " 64k",
      "write -q -P " + Hex(base + 2) + " " + N(100000 + shift) + " 3000",
      "write -q -s " + s.rnd + " " + N(1 * MiB + shift) + " 256k",
      "write -q -z " + N(1 * MiB + 64 * KiB) + " 64k",
      "write -q -z -u " + N(1 * MiB + 128 * KiB) + " 64k",
      "discard -q " + N(1 * MiB + 192 * KiB) + " 64k",
      // The same 64 KiB as at offset 0: a duplicate for a dedup tool to notice.
      "write -q -P " + Hex(base + 1) + " " + N(2 * MiB + shift) + " 64k",
      "write -q -P " + Hex(base + 3) + " " + N(2 * MiB + 70000 + shift) + " 512",
      // Subcluster-sized pieces (extended L2 images keep them apart).
      "write -q -P " + Hex(base + 5) + " " + N(3 * MiB + sub) + " " + N(sub),
      "write -q -P " + Hex(base + 6) + " " + N(3 * MiB + 5 * sub + 17 + shift % sub) + " 100",
      "write -q -P " + Hex(base + 7) + " " + N(3 * MiB + 8 * sub) + " " + N(4 * sub),
      "write -q -z " + N(3 * MiB + 9 * sub) + " " + N(sub),
      "discard -q " + N(3 * MiB + 10 * sub) + " " + N(sub),
      // A partial write that ends at the end of the disk.
      "write -q -P " + Hex(base + 4) + " " + N(vsize - 1000) + " 1000",
  };
  if (compressed_write && 4 * MiB + cs <= vsize) c.push_back("write -q -c " + N(4 * MiB) + " " + N(cs));
  return c;
}

std::string QcowCreate(const std::string& path, uint64_t size, const std::string& options,
                       const std::string& cwd = "") {
  std::string cmd = "qemu-img create -q -f qcow2";
  if (!options.empty()) cmd += " -o " + Sh(options);
  cmd += " " + Sh(path) + " " + N(size);
  MustRun(InDir(cwd, cmd));
  return path;
}

// The heart of every test: qcow2dedup's reading of image (relative to cwd)
// against qemu-img's. Files in unchanged must keep their bytes.
void CheckReads(const Scratch& s, const std::string& image, const std::string& cwd = "",
                std::vector<std::string> unchanged = {}) {
  std::string image_path = cwd.empty() || image[0] == '/' ? image : cwd + "/" + image;
  unchanged.push_back(image_path);
  std::vector<std::string> before;
  for (const auto& f : unchanged) before.push_back(FileDigest(f));

  const std::string ref = s / "ref.raw", out = s / "out.raw", dd = s / "dedup.qcow2";
  std::filesystem::remove(ref);
  std::filesystem::remove(out);
  std::filesystem::remove(dd);
  MustRun(InDir(cwd, "qemu-img convert -O raw " + Sh(image) + " " + Sh(ref)));

  {
    std::string cmd = InDir(cwd, Tool() + " convert -O raw " + Sh(image) + " " + Sh(out));
    RunResult r = Run(cmd);
    INFO("command: ", cmd);
    INFO("stdout: ", r.out);
    INFO("stderr: ", r.err);
    CHECK(r.exit_code == 0);
    if (r.exit_code == 0) {
      RunResult c = Run("cmp " + Sh(ref) + " " + Sh(out));
      INFO("cmp: ", c.out, c.err);
      CHECK_MESSAGE(c.exit_code == 0, "qcow2dedup convert -O raw differs from qemu-img convert -O raw");
    }
  }

  // Both stat the same file, so even actual-size must agree.
  CompareInfo(OurInfo(image, cwd), QemuInfo(image, cwd));

  // The other direction of convert reads the image the same way.
  {
    std::string cmd = InDir(cwd, Tool() + " convert -O qcow2 " + Sh(image) + " " + Sh(dd));
    RunResult r = Run(cmd);
    INFO("command: ", cmd);
    INFO("stdout: ", r.out);
    INFO("stderr: ", r.err);
    CHECK(r.exit_code == 0);
    if (r.exit_code == 0) {
      RunResult chk = Run("qemu-img check " + Sh(dd));
      INFO("qemu-img check: ", chk.out, chk.err);
      CHECK(chk.exit_code == 0);
      RunResult cmp = Run("qemu-img compare -f raw -F qcow2 " + Sh(ref) + " " + Sh(dd));
      INFO("qemu-img compare: ", cmp.out, cmp.err);
      CHECK(cmp.exit_code == 0);
    }
  }

  for (size_t i = 0; i < unchanged.size(); ++i)
    CHECK_MESSAGE(FileDigest(unchanged[i]) == before[i], unchanged[i], " changed while being read");
}

const uint64_t kClusterSizes[] = {512, 4 * KiB, 64 * KiB, 2 * MiB};

}  // namespace

TEST_CASE("read: every compat level and cluster size") {
  for (const char* compat : {"0.10", "1.1"}) {
    for (uint64_t cs : kClusterSizes) {
      std::string name = std::string("compat=") + compat + " cluster_size=" + N(cs);
      SUBCASE(name.c_str()) {
        Scratch s;
        std::string img = QcowCreate(s / "img.qcow2", kVirtualSize,
                                     "compat=" + std::string(compat) + ",cluster_size=" + N(cs));
        QemuIo(img, Workload(s, cs, kVirtualSize, 0x10));
        CheckReads(s, img);
      }
    }
  }
}

TEST_CASE("read: empty images") {
  for (const char* compat : {"0.10", "1.1"}) {
    for (uint64_t cs : kClusterSizes) {
      std::string name = std::string("compat=") + compat + " cluster_size=" + N(cs);
      SUBCASE(name.c_str()) {
        Scratch s;
        std::string img = QcowCreate(s / "img.qcow2", kVirtualSize,
                                     "compat=" + std::string(compat) + ",cluster_size=" + N(cs));
        CheckReads(s, img);
      }
    }
  }
}

TEST_CASE("read: every refcount width") {
  for (int bits : {1, 2, 4, 8, 16, 32, 64}) {
    for (uint64_t cs : {uint64_t(512), 64 * KiB}) {
      std::string name = "refcount_bits=" + N(bits) + " cluster_size=" + N(cs);
      SUBCASE(name.c_str()) {
        Scratch s;
        std::string img = QcowCreate(s / "img.qcow2", kVirtualSize,
                                     "refcount_bits=" + N(bits) + ",cluster_size=" + N(cs));
        QemuIo(img, Workload(s, cs, kVirtualSize, 0x20));
        CheckReads(s, img);
      }
    }
  }
}

TEST_CASE("read: compressed clusters") {
  struct C {
    const char* compat;
    const char* type;
  };
  for (C c : {C{"1.1", "zlib"}, C{"1.1", "zstd"}, C{"0.10", "zlib"}}) {
    for (uint64_t cs : kClusterSizes) {
      std::string name = std::string("compat=") + c.compat + " compression_type=" + c.type +
                         " cluster_size=" + N(cs);
      SUBCASE(name.c_str()) {
        Scratch s;
        std::string src = QcowCreate(s / "src.qcow2", kVirtualSize, "cluster_size=" + N(cs));
        QemuIo(src, Workload(s, cs, kVirtualSize, 0x30));
        std::string img = s / "img.qcow2";
        std::string opts = std::string("compat=") + c.compat + ",cluster_size=" + N(cs);
        if (std::string(c.compat) != "0.10") opts += std::string(",compression_type=") + c.type;
        MustRun("qemu-img convert -c -O qcow2 -o " + Sh(opts) + " " + Sh(src) + " " + Sh(img));
        // Partial writes over compressed clusters (QEMU decompresses and
        // copies).
        QemuIo(img, {"write -q -P 0x3a 1000 100", "write -q -P 0x3b " + N(1 * MiB + 4096) + " 512"});
        RunResult chk = Run("qemu-img check --output=json " + Sh(img));
        INFO(chk.out);
        CHECK(chk.out.find("compressed-clusters") != std::string::npos);
        CheckReads(s, img);
      }
    }
  }
}

TEST_CASE("read: extended L2 entries (subclusters)") {
  for (uint64_t cs : {64 * KiB, 2 * MiB}) {
    std::string name = "cluster_size=" + N(cs);
    SUBCASE((name + " standalone").c_str()) {
      Scratch s;
      std::string img = QcowCreate(s / "img.qcow2", kVirtualSize, "extended_l2=on,cluster_size=" + N(cs));
      QemuIo(img, Workload(s, cs, kVirtualSize, 0x40));
      CheckReads(s, img);
    }
    SUBCASE((name + " over a backing file").c_str()) {
      // Unallocated subclusters read from the backing file, zero ones as zero.
      Scratch s;
      std::string base = QcowCreate(s / "base.qcow2", kVirtualSize, "");
      QemuIo(base, Workload(s, 64 * KiB, kVirtualSize, 0x50));
      std::string img = QcowCreate(s / "img.qcow2", kVirtualSize,
                                   "extended_l2=on,cluster_size=" + N(cs) + ",backing_file=" + base +
                                       ",backing_fmt=qcow2");
      QemuIo(img, Workload(s, cs, kVirtualSize, 0x60, 3 * 512));
      const uint64_t sub = cs / 32;
      QemuIo(img, {"write -q -P 0x6e " + N(5 * MiB + sub) + " " + N(sub),
                   "write -q -z " + N(5 * MiB + 3 * sub) + " " + N(sub),
                   "write -q -P 0x6f " + N(5 * MiB + 7 * sub + 100) + " 200"});
      CheckReads(s, img, "", {base});
    }
  }
}

TEST_CASE("read: backing files") {
  SUBCASE("qcow2 backing, absolute name") {
    Scratch s;
    std::string base = QcowCreate(s / "base.qcow2", kVirtualSize, "");
    QemuIo(base, Workload(s, 64 * KiB, kVirtualSize, 0x10));
    std::string img = QcowCreate(s / "img.qcow2", kVirtualSize, "backing_file=" + base + ",backing_fmt=qcow2");
    QemuIo(img, Workload(s, 64 * KiB, kVirtualSize, 0x70, 32 * KiB + 512));
    CheckReads(s, img, "", {base});
  }
  SUBCASE("v2 overlay on a v2 backing file") {
    Scratch s;
    std::string base = QcowCreate(s / "base.qcow2", kVirtualSize, "compat=0.10,cluster_size=4096");
    QemuIo(base, Workload(s, 4096, kVirtualSize, 0x10));
    std::string img = QcowCreate(s / "img.qcow2", kVirtualSize,
                                 "compat=0.10,backing_file=" + base + ",backing_fmt=qcow2");
    QemuIo(img, Workload(s, 64 * KiB, kVirtualSize, 0x70, 32 * KiB + 512));
    CheckReads(s, img, "", {base});
  }
  SUBCASE("raw backing file") {
    Scratch s;
    std::string base = s / "base.raw";
    WriteBytes(base, std::string(kVirtualSize, '\0'));
    PatchFile(base, 0, RandomBytes(200 * KiB, 7));
    PatchFile(base, 3 * MiB + 100, std::string(70 * KiB, '\x5a'));
    PatchFile(base, kVirtualSize - 4096, RandomBytes(4096, 8));
    std::string img = QcowCreate(s / "img.qcow2", kVirtualSize, "backing_file=" + base + ",backing_fmt=raw");
    QemuIo(img, Workload(s, 64 * KiB, kVirtualSize, 0x70, 32 * KiB + 512));
    CheckReads(s, img, "", {base});
  }
  SUBCASE("relative backing name, read from another directory") {
    Scratch s;
    std::filesystem::create_directories(s / "dir/sub");
    QcowCreate("base.qcow2", kVirtualSize, "", s / "dir");
    QemuIo("base.qcow2", Workload(s, 64 * KiB, kVirtualSize, 0x10), "qcow2", s / "dir");
    MustRun(InDir(s / "dir", "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2 " + N(kVirtualSize)));
    QemuIo("dir/ov.qcow2", Workload(s, 64 * KiB, kVirtualSize, 0x70, 32 * KiB + 512), "qcow2", s.dir.path());
    // From the scratch directory: "base.qcow2" means dir/base.qcow2.
    CheckReads(s, "dir/ov.qcow2", s.dir.path(), {s / "dir/base.qcow2"});
    // And a backing name that climbs out of the image's directory.
    MustRun(InDir(s / "dir/sub",
                  "qemu-img create -q -f qcow2 -b ../base.qcow2 -F qcow2 up.qcow2 " + N(kVirtualSize)));
    QemuIo("dir/sub/up.qcow2", {"write -q -P 0x99 4096 4096"}, "qcow2", s.dir.path());
    CheckReads(s, "dir/sub/up.qcow2", s.dir.path(), {s / "dir/base.qcow2"});
    // The same, from the root directory with a relative path.
    std::string from_root = std::filesystem::relative(s / "dir/sub/up.qcow2", "/").string();
    CheckReads(s, from_root, "/", {s / "dir/base.qcow2"});
  }
  SUBCASE("three-deep chain with mixed cluster sizes and versions") {
    Scratch s;
    std::string base = QcowCreate(s / "base.qcow2", kVirtualSize, "cluster_size=65536");
    QemuIo(base, Workload(s, 64 * KiB, kVirtualSize, 0x10));
    std::string mid = QcowCreate(s / "mid.qcow2", kVirtualSize,
                                 "compat=0.10,cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2");
    QemuIo(mid, Workload(s, 4096, kVirtualSize, 0x70, 2048 + 512));
    std::string top = QcowCreate(s / "top.qcow2", kVirtualSize,
                                 "cluster_size=512,backing_file=mid.qcow2,backing_fmt=qcow2");
    QemuIo(top, Workload(s, 512, kVirtualSize, 0xa0, 40 * KiB + 1024));
    CheckReads(s, top, "", {base, mid});
  }
  SUBCASE("backing file smaller than the overlay") {
    Scratch s;
    const uint64_t small = 1 * MiB + 512;
    std::string base = QcowCreate(s / "base.qcow2", small, "");
    QemuIo(base, {"write -q -P 0x77 0 64k", "write -q -P 0x78 " + N(small - 5000) + " 5000"});
    std::string img = QcowCreate(s / "img.qcow2", kVirtualSize, "backing_file=" + base + ",backing_fmt=qcow2");
    // Partial writes straddling the end of the backing file copy what is
    // there and zeros past it.
    QemuIo(img, {"write -q -P 0x79 " + N(small - 3000) + " 100", "write -q -P 0x7a " + N(small + 1000) + " 100",
                 "write -q -P 0x7b " + N(4 * MiB) + " 4k"});
    CheckReads(s, img, "", {base});
  }
  SUBCASE("raw backing file smaller than the overlay, not sector-aligned") {
    Scratch s;
    std::string base = s / "base.raw";
    WriteBytes(base, RandomBytes(1 * MiB + 333, 9));
    std::string img = QcowCreate(s / "img.qcow2", kVirtualSize, "backing_file=" + base + ",backing_fmt=raw");
    QemuIo(img, {"write -q -P 0x7c 8192 100"});
    CheckReads(s, img, "", {base});
  }
}

TEST_CASE("read: internal snapshots (the active layer is read)") {
  for (const char* compat : {"0.10", "1.1"}) {
    for (uint64_t cs : {uint64_t(512), 64 * KiB}) {
      std::string name = std::string("compat=") + compat + " cluster_size=" + N(cs);
      SUBCASE(name.c_str()) {
        Scratch s;
        std::string img = QcowCreate(s / "img.qcow2", kVirtualSize,
                                     "compat=" + std::string(compat) + ",cluster_size=" + N(cs));
        QemuIo(img, Workload(s, cs, kVirtualSize, 0x10));
        MustRun("qemu-img snapshot -c s1 " + Sh(img));
        QemuIo(img, {"write -q -P 0xc1 0 32k", "discard -q " + N(1 * MiB) + " 128k",
                     "write -q -z " + N(2 * MiB) + " 64k", "write -q -P 0xc2 " + N(5 * MiB + 7) + " 9000"});
        MustRun("qemu-img snapshot -c s2 " + Sh(img));
        QemuIo(img, {"write -q -P 0xc3 100 200"});
        MustRun("qemu-img snapshot -c 'third snapshot' " + Sh(img));
        MustRun("qemu-img snapshot -d s2 " + Sh(img));
        QemuIo(img, {"write -q -P 0xc4 " + N(4 * MiB) + " 64k", "write -q -z 0 4k"});
        CheckReads(s, img);
      }
    }
  }
}

TEST_CASE("read: preallocated images") {
  for (const char* mode : {"metadata", "falloc", "full"}) {
    for (uint64_t cs : {4 * KiB, 64 * KiB}) {
      std::string name = std::string("preallocation=") + mode + " cluster_size=" + N(cs);
      SUBCASE(name.c_str()) {
        Scratch s;
        std::string img = QcowCreate(s / "img.qcow2", kVirtualSize,
                                     std::string("preallocation=") + mode + ",cluster_size=" + N(cs));
        // (Compressed writes go only to unallocated clusters: none here.)
        QemuIo(img, Workload(s, cs, kVirtualSize, 0x80, 0, /*compressed_write=*/false));
        CheckReads(s, img);
      }
    }
  }
}

TEST_CASE("read: lazy refcounts") {
  SUBCASE("closed cleanly") {
    Scratch s;
    std::string img = QcowCreate(s / "img.qcow2", kVirtualSize, "lazy_refcounts=on");
    QemuIo(img, Workload(s, 64 * KiB, kVirtualSize, 0x90));
    CheckReads(s, img);
  }
  SUBCASE("left dirty by a crash") {
    Scratch s;
    std::string img = QcowCreate(s / "img.qcow2", kVirtualSize, "lazy_refcounts=on");
    std::string cmd = "qemu-io -f qcow2";
    for (const auto& c : Workload(s, 64 * KiB, kVirtualSize, 0x90)) cmd += " -c " + Sh(c);
    cmd += " -c abort " + Sh(img);
    Run(cmd);  // dies of SIGABRT on purpose
    REQUIRE(QemuInfo(img)["dirty-flag"] == true);
    CheckReads(s, img);
  }
}

TEST_CASE("read: raw output of a mostly empty image stays sparse") {
  for (uint64_t cs : {64 * KiB, 2 * MiB}) {
    std::string name = "cluster_size=" + N(cs);
    SUBCASE(name.c_str()) {
      Scratch s;
      const uint64_t vsize = 256 * MiB;
      std::string img = QcowCreate(s / "img.qcow2", vsize, "cluster_size=" + N(cs));
      QemuIo(img, {"write -q -P 0x11 0 64k", "write -q -P 0x12 " + N(10 * MiB) + " 4k",
                   "write -q -P 0x13 " + N(33 * MiB + 5) + " 100", "write -q -z " + N(100 * MiB) + " 8M"});
      std::string ref = s / "ref.raw", out = s / "out.raw";
      MustRun("qemu-img convert -O raw " + Sh(img) + " " + Sh(ref));
      MustRun(Tool() + " convert -O raw " + Sh(img) + " " + Sh(out));
      MustRun("cmp " + Sh(ref) + " " + Sh(out));
      uint64_t ref_alloc = AllocatedBytes(ref), out_alloc = AllocatedBytes(out);
      INFO("allocated bytes: qemu-img ", ref_alloc, ", qcow2dedup ", out_alloc);
      CHECK(out_alloc <= ref_alloc + 256 * KiB);
    }
  }
  SUBCASE("an empty image gives an empty raw file") {
    Scratch s;
    std::string img = QcowCreate(s / "img.qcow2", 1024 * MiB, "");
    std::string out = s / "out.raw";
    MustRun(Tool() + " convert -O raw " + Sh(img) + " " + Sh(out));
    CHECK(std::filesystem::file_size(out) == 1024 * MiB);
    CHECK(AllocatedBytes(out) <= 64 * KiB);
  }
}
