// Writing into images QEMU wrote, of kinds our own images never are.
// Internal snapshots (qemu-img snapshot -c): clusters and L2 tables a
// snapshot shares are copied on write, never changed in place, so every
// snapshot keeps its data (qemu-img convert -l reads it unchanged) and
// qemu-img snapshot -a still returns to it. Extended L2 entries: partly
// allocated clusters, zero subclusters, and QEMU writing after us. Every
// time the active view is what was written, and qemu-img check and ours
// stay clean (COPIED exactly when the refcount is 1).
#include <doctest/doctest.h>

#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

#include <fstream>

using namespace testing;

namespace {

void Must(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

void Raw(const std::string& img, const std::string& raw, const std::string& snapshot = "") {
  Must("qemu-img convert -f qcow2 " + (snapshot.empty() ? "" : "-l " + Sh(snapshot) + " ") + "-O raw " + Sh(img) +
       " " + Sh(raw));
}

void BothClean(const std::string& img, const std::string& compat = "1.1") {
  CheckQemuClean(img, compat);
  RunResult ours = Run(Tool() + " check " + Sh(img));
  CHECK_MESSAGE(ours.exit_code == 0, ours.out, ours.err);
}

// Writes n bytes of value v at offset into the raw model file.
void Poke(const std::string& raw, uint64_t offset, uint64_t n, char v) {
  std::fstream f(raw, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(f);
  f.seekp(std::streamoff(offset));
  const std::string bytes(n, v);
  f.write(bytes.data(), std::streamsize(n));
}

}  // namespace

TEST_CASE("write, dedup and a second snapshot on an image with internal snapshots") {
  REQUIRE_MESSAGE(HaveCommand("qemu-io"), "qemu-io is missing: install qemu-utils");
  for (const char* cluster : {"4096", "65536"}) {
    CAPTURE(cluster);
    TempDir dir;
    const std::string img = dir / "s.qcow2";
    Must("qemu-img create -q -f qcow2 -o cluster_size=" + std::string(cluster) + " " + Sh(img) + " 8M");
    Must("qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 2M 1M' -c 'write -P 0x11 4M 64k' " + Sh(img));
    Raw(img, dir / "snap1.raw");
    Must("qemu-img snapshot -c snap1 " + Sh(img));

    // Over shared data, and data that duplicates the snapshot's.
    Must(Tool() + " write --pattern 0x33 --length 300K " + Sh(img) + " 100K");
    Must(Tool() + " write --pattern 0x11 --length 1M " + Sh(img) + " 6M");
    BothClean(img);
    Raw(img, dir / "after-write.raw");
    CheckQemuIdentical(img, dir / "after-write.raw");
    Raw(img, dir / "snap1-now.raw", "snap1");
    CHECK(Run("cmp " + Sh(dir / "snap1.raw") + " " + Sh(dir / "snap1-now.raw")).exit_code == 0);

    // A second snapshot over our shared clusters doubles their refcounts.
    Must("qemu-img snapshot -c snap2 " + Sh(img));
    Must(Tool() + " write --pattern 0x44 --length 1M " + Sh(img) + " 1536K");
    Must(Tool() + " dedup -q " + Sh(img));
    BothClean(img);
    Raw(img, dir / "after-dedup.raw");
    Raw(img, dir / "snap2-now.raw", "snap2");
    CHECK(Run("cmp " + Sh(dir / "after-write.raw") + " " + Sh(dir / "snap2-now.raw")).exit_code == 0);
    Raw(img, dir / "snap1-now.raw", "snap1");
    CHECK(Run("cmp " + Sh(dir / "snap1.raw") + " " + Sh(dir / "snap1-now.raw")).exit_code == 0);

    // QEMU can still go back.
    Must("qemu-img snapshot -a snap1 " + Sh(img));
    CheckQemuIdentical(img, dir / "snap1.raw");
    BothClean(img);
    Must("qemu-img snapshot -a snap2 " + Sh(img));
    CheckQemuIdentical(img, dir / "after-write.raw");
    BothClean(img);
  }
}

TEST_CASE("write and dedup on an image with extended L2 entries (subclusters)") {
  REQUIRE_MESSAGE(HaveCommand("qemu-io"), "qemu-io is missing: install qemu-utils");
  TempDir dir;
  const std::string img = dir / "x.qcow2", raw = dir / "x.raw";
  Must("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64K " + Sh(img) + " 4M");
  // Partly allocated clusters, zero subclusters, and a duplicate QEMU stored twice.
  Must("qemu-io -c 'write -P 0x11 0 4k' -c 'write -P 0x22 70k 6k' -c 'write -z 128k 64k' "
       "-c 'write -P 0x33 256k 64k' -c 'write -P 0x33 320k 64k' -c 'write -P 0x66 400k 2k' " + Sh(img));
  Raw(img, raw);
  // Into a partly allocated cluster, over a zero one, and a copy of stored data.
  Must(Tool() + " write --pattern 0x44 --length 10K " + Sh(img) + " 66K");
  Poke(raw, 66 << 10, 10 << 10, 0x44);
  Must(Tool() + " write --pattern 0x45 --length 3K " + Sh(img) + " 130K");
  Poke(raw, 130 << 10, 3 << 10, 0x45);
  Must(Tool() + " write --pattern 0x33 --length 64K " + Sh(img) + " 1M");
  Poke(raw, 1 << 20, 64 << 10, 0x33);
  BothClean(img);
  CheckQemuIdentical(img, raw);
  RunResult d = Run(Tool() + " dedup --output=json " + Sh(img));
  REQUIRE_MESSAGE(d.exit_code == 0, d.err);
  CHECK(nlohmann::json::parse(d.out)["freed-clusters"] == 1);  // one of QEMU's two 0x33 copies
  BothClean(img);
  CheckQemuIdentical(img, raw);
  // QEMU writes a subcluster of a cluster we share: it must copy, not write in place.
  Must("qemu-io -c 'write -P 0x55 1M 2k' " + Sh(img));
  Poke(raw, 1 << 20, 2 << 10, 0x55);
  CheckQemuIdentical(img, raw);
  BothClean(img);
  Must(Tool() + " write --pattern 0x33 --length 64K " + Sh(img) + " 2M");
  Poke(raw, 2 << 20, 64 << 10, 0x33);
  BothClean(img);
  CheckQemuIdentical(img, raw);
}

// Version 2 (compat=0.10): no zero flag, no dirty bit, no autoclear bits.
// The image stays version 2; zeros over a backing file are stored as data
// (nothing else reads as zeros there); an internal snapshot keeps its data.
TEST_CASE("write, dedup and convert -n on version 2 images") {
  REQUIRE_MESSAGE(HaveCommand("qemu-io"), "qemu-io is missing: install qemu-utils");
  auto compat = [](const std::string& img) {
    return QemuImgInfo(img)["format-specific"]["data"]["compat"].get<std::string>();
  };
  for (const char* cluster : {"4096", "65536"}) {
    CAPTURE(cluster);
    TempDir dir;
    const std::string img = dir / "v2.qcow2", raw = dir / "v2.raw";
    Must("qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=" + std::string(cluster) + " " + Sh(img) + " 8M");
    Must("qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 2M 1M' -c 'write -P 0x11 4M 64k' " + Sh(img));
    Raw(img, dir / "snap.raw");
    Must("qemu-img snapshot -c snap " + Sh(img));
    Raw(img, raw);
    Must(Tool() + " write --pattern 0x33 --length 300K " + Sh(img) + " 100K");
    Poke(raw, 100 << 10, 300 << 10, 0x33);
    Must(Tool() + " write --pattern 0x11 --length 1M " + Sh(img) + " 6M");
    Poke(raw, 6 << 20, 1 << 20, 0x11);
    Must(Tool() + " write --pattern 0 --length 128K " + Sh(img) + " 2M");
    Poke(raw, 2 << 20, 128 << 10, 0);
    BothClean(img, "0.10");
    CheckQemuIdentical(img, raw);
    CHECK(compat(img) == "0.10");
    RunResult d = Run(Tool() + " dedup --output=json " + Sh(img));
    REQUIRE_MESSAGE(d.exit_code == 0, d.err);
    CHECK(nlohmann::json::parse(d.out)["relinked-clusters"].get<uint64_t>() > 0);
    BothClean(img, "0.10");
    CheckQemuIdentical(img, raw);
    CHECK(compat(img) == "0.10");
    Raw(img, dir / "snap-now.raw", "snap");
    CHECK(Run("cmp " + Sh(dir / "snap.raw") + " " + Sh(dir / "snap-now.raw")).exit_code == 0);
    // QEMU writes after us (into a cluster we share: it must copy).
    Must("qemu-io -c 'write -P 0x55 6M 4k' " + Sh(img));
    Poke(raw, 6 << 20, 4 << 10, 0x55);
    CheckQemuIdentical(img, raw);
    BothClean(img, "0.10");
    // convert -n into it.
    Must("qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=" + std::string(cluster) + " " +
         Sh(dir / "target.qcow2") + " 8M");
    Must(Tool() + " convert -n -f raw " + Sh(raw) + " " + Sh(dir / "target.qcow2"));
    BothClean(dir / "target.qcow2", "0.10");
    CheckQemuIdentical(dir / "target.qcow2", raw);
    CHECK(compat(dir / "target.qcow2") == "0.10");
  }
}

TEST_CASE("version 2 with a backing file: zeros over it are stored, dedup keeps them") {
  REQUIRE_MESSAGE(HaveCommand("qemu-io"), "qemu-io is missing: install qemu-utils");
  TempDir dir;
  const std::string base = dir / "base.qcow2", img = dir / "top.qcow2", raw = dir / "top.raw";
  Must("qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 " + Sh(base) + " 4M");
  Must("qemu-io -c 'write -P 0x55 0 4M' " + Sh(base));
  Must("qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2 " +
       Sh(img));
  Raw(base, raw);
  Must(Tool() + " write --pattern 0 --length 64K " + Sh(img) + " 64K");
  Poke(raw, 64 << 10, 64 << 10, 0);
  Must(Tool() + " write --pattern 0x66 --length 64K " + Sh(img) + " 1M");
  Poke(raw, 1 << 20, 64 << 10, 0x66);
  // QEMU stores zeros as data too (no zero flag in version 2), and a duplicate.
  Must("qemu-io -c 'write -P 0 2M 64k' -c 'write -P 0x66 3M 64k' " + Sh(img));
  Poke(raw, 2 << 20, 64 << 10, 0);
  Poke(raw, 3 << 20, 64 << 10, 0x66);
  BothClean(img, "0.10");
  CheckQemuIdentical(img, raw);
  RunResult d = Run(Tool() + " dedup --output=json " + Sh(img));
  REQUIRE_MESSAGE(d.exit_code == 0, d.err);
  const auto j = nlohmann::json::parse(d.out);
  CHECK(j["zero-clusters"] == 0);         // nothing over the backing file may become unallocated
  CHECK(j["stored-clusters-after"] == 2);  // one cluster of zeros, one of 0x66
  BothClean(img, "0.10");
  CheckQemuIdentical(img, raw);
  CHECK(QemuImgInfo(img)["format-specific"]["data"]["compat"] == "0.10");
}
