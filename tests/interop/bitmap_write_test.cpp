// Writing into images with persistent dirty bitmaps (qemu-img bitmap
// --add): every range we write is dirty afterwards in every enabled bitmap,
// read back the way a backup tool reads it (qemu-nbd -B NAME, nbdinfo
// --map=qemu:dirty-bitmap:NAME); a disabled bitmap stays as it was;
// dedup, which changes no guest data, leaves the bitmaps as they were;
// qemu-img check stays clean and qemu-img info shows the same bitmaps with
// the same flags (not in-use). A run that fails part way leaves the bitmap
// in-use (inconsistent, as QEMU leaves it), never stale.
#include <initializer_list>
#include <doctest/doctest.h>

#include <filesystem>
#include <vector>

#include "qcow2dedup/image.h"
#include "support/fault_file.h"
#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;  // offset, length

void Must(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

// The dirty ranges of bitmap name, as qemu-nbd exports them to nbdinfo.
Ranges DirtyMap(const std::string& img, const std::string& name, const TempDir& dir) {
  const std::string sock = dir / "nbd.sock";
  std::filesystem::remove(sock);
  BackgroundProcess nbd("exec qemu-nbd -r -t -k " + Sh(sock) + " -f qcow2 -B " + Sh(name) + " " + Sh(img));
  REQUIRE(WaitFor([&] { return std::filesystem::exists(sock) || !nbd.Running(); }, 10));
  REQUIRE_MESSAGE(nbd.Running(), "qemu-nbd -B ", name, " did not start");
  RunResult r = Run("nbdinfo --json --map=qemu:dirty-bitmap:" + name + " " + Sh("nbd+unix:///?socket=" + sock));
  nbd.Kill();
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  Ranges dirty;
  for (const auto& e : nlohmann::json::parse(r.out))
    if (e["type"].get<uint64_t>() & 1) dirty.emplace_back(e["offset"].get<uint64_t>(), e["length"].get<uint64_t>());
  return dirty;
}

// ranges rounded out to the bitmap's granularity and merged.
Ranges Rounded(Ranges in, uint64_t gran) {
  std::sort(in.begin(), in.end());
  Ranges out;
  for (auto [off, len] : in) {
    const uint64_t a = off / gran * gran, b = (off + len + gran - 1) / gran * gran;
    if (!out.empty() && out.back().first + out.back().second >= a)
      out.back().second = std::max(out.back().first + out.back().second, b) - out.back().first;
    else
      out.emplace_back(a, b - a);
  }
  return out;
}

std::string Show(const Ranges& r) {
  std::string s;
  for (auto [o, l] : r) s += "[" + std::to_string(o) + "+" + std::to_string(l) + "] ";
  return s;
}

void CheckBitmaps(const std::string& img, const std::vector<std::pair<std::string, std::string>>& want) {
  CheckQemuClean(img);
  RunResult ours = Run(Tool() + " check " + Sh(img));
  CHECK_MESSAGE(ours.exit_code == 0, ours.out, ours.err);
  const auto info = QemuImgInfo(img);
  const auto& got = info["format-specific"]["data"]["bitmaps"];
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    CHECK(got[i]["name"] == want[i].first);
    std::string flags;
    for (const auto& f : got[i]["flags"]) flags += f.get<std::string>() + " ";
    CHECK_MESSAGE(flags == want[i].second, "bitmap ", want[i].first, " flags: ", flags);
  }
}

// Ours and qemu-img's copy of the same source: the same bitmaps in
// qemu-img info, each with the same dirty map.
void CheckSameBitmaps(const std::string& ours, const std::string& theirs, std::initializer_list<const char*> names,
                      const TempDir& dir) {
  CheckQemuClean(ours);
  CHECK(QemuImgInfo(ours)["format-specific"]["data"]["bitmaps"] ==
        QemuImgInfo(theirs)["format-specific"]["data"]["bitmaps"]);
  for (const char* name : names) {
    CAPTURE(name);
    CHECK(DirtyMap(ours, name, dir) == DirtyMap(theirs, name, dir));
  }
}

}  // namespace

TEST_CASE("write, convert -n and dedup mark every enabled persistent bitmap") {
  REQUIRE_MESSAGE(HaveCommand("qemu-nbd"), "qemu-nbd is missing: install qemu-utils");
  REQUIRE_MESSAGE(HaveCommand("nbdinfo"), "nbdinfo is missing: install libnbd-bin");
  TempDir dir;
  const std::string img = dir / "b.qcow2";
  Must("qemu-img create -q -f qcow2 " + Sh(img) + " 16M");
  Must("qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x33 8M 64k' " + Sh(img));
  Must("qemu-img bitmap --add " + Sh(img) + " b64k");
  Must("qemu-img bitmap --add --disable " + Sh(img) + " off");
  Must("qemu-img bitmap --add -g 4096 " + Sh(img) + " b4k");
  Must("qemu-img bitmap --add -g 512 " + Sh(img) + " b512");
  // QEMU's own write after the bitmaps exist: dirty too, our marks add to it.
  Must("qemu-io -c 'write -P 0x44 3M 4k' " + Sh(img));
  Ranges written = {{3 << 20, 4096}};
  // Unaligned, a copy of stored data (a dedup hit), zeros over data.
  Must(Tool() + " write --pattern 0x22 --length 100K " + Sh(img) + " 5243000");
  written.emplace_back(5243000, 100 << 10);
  Must(Tool() + " write --pattern 0x11 --length 64K " + Sh(img) + " 12M");
  written.emplace_back(12 << 20, 64 << 10);
  Must(Tool() + " write --pattern 0 --length 8K " + Sh(img) + " 520K");
  written.emplace_back(520 << 10, 8 << 10);
  const std::vector<std::pair<std::string, std::string>> bitmaps = {
      {"b64k", "auto "}, {"off", ""}, {"b4k", "auto "}, {"b512", "auto "}};
  CheckBitmaps(img, bitmaps);
  // (No structured binding inside CAPTURE: clang 14 cannot capture one.)
  for (const auto& p : {std::pair{"b64k", 65536}, {"b4k", 4096}, {"b512", 512}}) {
    const char* name = p.first;
    const int gran = p.second;
    CAPTURE(name);
    const Ranges got = DirtyMap(img, name, dir), want = Rounded(written, gran);
    CHECK_MESSAGE(got == want, "dirty: ", Show(got), " want: ", Show(want));
  }
  CHECK(DirtyMap(img, "off", dir).empty());

  // dedup changes no guest data: no bitmap changes.
  Must(Tool() + " dedup -q " + Sh(img));
  CheckBitmaps(img, bitmaps);
  CHECK(DirtyMap(img, "b4k", dir) == Rounded(written, 4096));

  // convert -n into it: everything the source holds is written.
  Must("qemu-img create -q -f raw " + Sh(dir / "src.raw") + " 16M");
  Must("qemu-io -f raw -c 'write -P 0x55 2M 1M' -c 'write -P 0x66 15M 128k' " + Sh(dir / "src.raw"));
  Must(Tool() + " convert -n -f raw " + Sh(dir / "src.raw") + " " + Sh(img));
  CheckBitmaps(img, bitmaps);
  const Ranges after = DirtyMap(img, "b64k", dir);
  written.emplace_back(2 << 20, 1 << 20);
  written.emplace_back(15 << 20, 128 << 10);
  // At least what was written is dirty (convert -n writes what it must
  // to make the target equal the source, in whole clusters).
  for (const auto& range : Rounded(written, 65536)) {
    const uint64_t off = range.first, len = range.second;
    bool covered = false;
    for (auto [o, l] : after) covered |= o <= off && off + len <= o + l;
    CHECK_MESSAGE(covered, "[", off, "+", len, "] is not dirty after convert -n: ", Show(after));
  }
  CheckQemuIdentical(img, dir / "src.raw");
}

TEST_CASE("a write that fails part way leaves the bitmap in-use, never stale") {
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  TempDir dir;
  const std::string img = dir / "b.qcow2";
  Must("qemu-img create -q -f qcow2 " + Sh(img) + " 16M");
  Must("qemu-img bitmap --add " + Sh(img) + " b");
  {
    auto ff = FaultFile::Open(img);
    REQUIRE(ff.ok());
    qcow2dedup::OpenOptions o;
    o.writable = true;
    o.file = (*ff)->Share();
    auto image = qcow2dedup::Image::Open(img, std::move(o));
    REQUIRE(image.ok());
    std::vector<uint8_t> data(1 << 20, 0x77);
    REQUIRE((*image)->Write(4 << 20, data).ok());
    REQUIRE((*image)->Flush().ok());
    // Gone without a Close: as a kill would leave it.
    image->reset();
    ff->reset();
  }
  const auto info = QemuImgInfo(img);
  std::string flags;
  for (const auto& f : info["format-specific"]["data"]["bitmaps"][0]["flags"]) flags += f.get<std::string>() + " ";
  CHECK(flags == "in-use auto ");
  RunResult r = Run("qemu-img check -r all " + Sh(img));
  CHECK_MESSAGE(r.exit_code == 0, r.out, r.err);
}

TEST_CASE("convert --bitmaps carries the bitmaps as qemu-img convert --bitmaps does") {
  REQUIRE_MESSAGE(HaveCommand("qemu-nbd"), "qemu-nbd is missing: install qemu-utils");
  REQUIRE_MESSAGE(HaveCommand("nbdinfo"), "nbdinfo is missing: install libnbd-bin");
  TempDir dir;
  const std::string src = dir / "src.qcow2", ours = dir / "ours.qcow2", theirs = dir / "theirs.qcow2";
  Must("qemu-img create -q -f qcow2 -o cluster_size=4096 " + Sh(src) + " 24M");
  Must("qemu-img bitmap --add " + Sh(src) + " early");
  Must("qemu-io -c 'write -P 0x11 0 3M' -c 'write -P 0x11 8M 1M' " + Sh(src));
  Must("qemu-img bitmap --add -g 512k " + Sh(src) + " coarse");
  Must("qemu-img bitmap --add --disable -g 4k " + Sh(src) + " frozen");
  Must("qemu-io -c 'write -P 0x22 5M 12k' -c 'write -z 20M 1M' " + Sh(src));
  Must("qemu-img bitmap --disable " + Sh(src) + " frozen");
  // Fully dirty: every table entry QEMU stores as data.
  Must("qemu-img bitmap --add -g 64k " + Sh(src) + " all");
  Must("qemu-io -c 'write -P 0x33 0 24M' " + Sh(dir / "src.qcow2"));
  Must(Tool() + " convert --bitmaps -o cluster_size=65536 " + Sh(src) + " " + Sh(ours));
  Must("qemu-img convert --bitmaps -O qcow2 " + Sh(src) + " " + Sh(theirs));
  CheckSameBitmaps(ours, theirs, {"early", "coarse", "frozen", "all"}, dir);
  RunResult check = Run(Tool() + " check " + Sh(ours));
  CHECK_MESSAGE(check.exit_code == 0, check.out, check.err);
  for (const char* name : {"early", "coarse", "frozen", "all"}) {
    CAPTURE(name);
    CHECK(DirtyMap(src, name, dir) == DirtyMap(theirs, name, dir));
  }
  CHECK(!DirtyMap(ours, "early", dir).empty());
  // Writes after the convert mark the copied bitmaps.
  Must(Tool() + " write --pattern 0x44 --length 4K " + Sh(ours) + " 16M");
  const Ranges early = DirtyMap(ours, "early", dir);
  bool covered = false;
  for (auto [o, l] : early) covered |= o <= (16u << 20) && (16u << 20) + 4096 <= o + l;
  CHECK_MESSAGE(covered, Show(early));
  CheckQemuClean(ours);
}

TEST_CASE("convert -n --bitmaps adds the bitmaps to the target as qemu-img convert -n --bitmaps does") {
  REQUIRE_MESSAGE(HaveCommand("qemu-nbd"), "qemu-nbd is missing: install qemu-utils");
  REQUIRE_MESSAGE(HaveCommand("nbdinfo"), "nbdinfo is missing: install libnbd-bin");
  TempDir dir;
  const std::string src = dir / "src.qcow2", ours = dir / "ours.qcow2", theirs = dir / "theirs.qcow2";
  Must("qemu-img create -q -f qcow2 -o cluster_size=4096 " + Sh(src) + " 8M");
  Must("qemu-img bitmap --add " + Sh(src) + " b1");
  Must("qemu-io -c 'write -P 0x11 1M 64k' -c 'write -P 0x12 5M 4k' " + Sh(src));
  Must("qemu-img bitmap --add --disable -g 128k " + Sh(src) + " b2");
  Must(Tool() + " create -q " + Sh(ours) + " 8M");
  Must("qemu-img create -q -f qcow2 " + Sh(theirs) + " 8M");
  Must(Tool() + " convert -n --bitmaps " + Sh(src) + " " + Sh(ours));
  Must("qemu-img convert -n --bitmaps -O qcow2 " + Sh(src) + " " + Sh(theirs));
  CheckSameBitmaps(ours, theirs, {"b1", "b2"}, dir);
  CHECK(Run("qemu-img compare " + Sh(src) + " " + Sh(ours)).exit_code == 0);
  // Again: the names are taken now, and both tools say so.
  RunResult again = Run(Tool() + " convert -n --bitmaps " + Sh(src) + " " + Sh(ours));
  RunResult q = Run("qemu-img convert -n --bitmaps -O qcow2 " + Sh(src) + " " + Sh(theirs));
  CHECK(again.exit_code == 1);
  CHECK(q.exit_code == 1);
  CHECK(q.err == "qemu-img: Failed to create bitmap b2: Bitmap already exists: b2\n");
  CHECK(again.err == "qcow2dedup: Failed to create bitmap b2: Bitmap already exists: b2\n");
}

TEST_CASE("serve: a client's writes and trims are marked in the bitmap") {
  REQUIRE_MESSAGE(HaveCommand("qemu-nbd"), "qemu-nbd is missing: install qemu-utils");
  REQUIRE_MESSAGE(HaveCommand("nbdinfo"), "nbdinfo is missing: install libnbd-bin");
  REQUIRE_MESSAGE(HaveCommand("nbdkit"), "nbdkit is missing: install nbdkit");
  TempDir dir;
  const std::string img = dir / "s.qcow2";
  Must("qemu-img create -q -f qcow2 " + Sh(img) + " 8M");
  Must("qemu-io -c 'write -P 0x11 0 8M' " + Sh(img));
  Must("qemu-img bitmap --add -g 4096 " + Sh(img) + " b");
  Must(Tool() + " serve --run " +
       Sh("qemu-io -f raw -c 'write -P 0x22 1M 12k' -c 'discard 6M 64k' -c 'write -z 7M 8k' \"$uri\"") + " " + Sh(img));
  CheckBitmaps(img, {{"b", "auto "}});
  const Ranges want = {{1 << 20, 12 << 10}, {6 << 20, 64 << 10}, {7 << 20, 8 << 10}};
  const Ranges got = DirtyMap(img, "b", dir);
  // Whole clusters for what the plugin writes as clusters: at least these.
  for (const auto& range : want) {
    const uint64_t off = range.first, len = range.second;
    bool covered = false;
    for (auto [o, l] : got) covered |= o <= off && off + len <= o + l;
    CHECK_MESSAGE(covered, "[", off, "+", len, "] is not dirty: ", Show(got));
  }
  uint64_t dirty = 0;
  for (auto [o, l] : got) dirty += l;
  CHECK(dirty <= 3 * 65536);  // nothing beyond the clusters written
}
