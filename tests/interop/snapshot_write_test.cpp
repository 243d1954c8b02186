// Writing into images with internal snapshots (qemu-img snapshot -c):
// clusters and L2 tables a snapshot shares are copied on write, never
// changed in place, so every snapshot keeps its data (qemu-img convert -l
// reads it unchanged) and qemu-img snapshot -a still returns to it; the
// active view is what was written; qemu-img check and ours stay clean
// (COPIED exactly when the refcount is 1).
#include <doctest/doctest.h>

#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

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

void BothClean(const std::string& img) {
  CheckQemuClean(img);
  RunResult ours = Run(Tool() + " check " + Sh(img));
  CHECK_MESSAGE(ours.exit_code == 0, ours.out, ours.err);
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
