// check's hash pass over compressed clusters: every distinct compressed
// copy is decompressed and hashed beside the plain clusters. Images from
// `qemu-img convert -c` (zlib and zstd; QEMU stores every cluster apart, so
// repeated data shows as duplicates) and from our `convert -c` (each
// distinct cluster once: no duplicates). Judged by the independent layout
// reader (which copies are compressed, which plain), the raw input (which
// clusters hold the same data), qemu-img check (the structure stays clean
// when a compressed stream is damaged) and qemu-io (whose read of the
// damaged cluster fails: the guest data really is lost).
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <set>
#include <string>

#include "support/check_output.h"
#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_images.h"
#include "support/qemu_tools.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace testing;
using testing::images::MustRun;

namespace {

constexpr uint64_t kCluster = 65536;

std::string Text(uint32_t seed) {
  std::string s;
  for (uint32_t i = 0; s.size() < kCluster; ++i) s += fmt::format("block {} line {} ", seed, i * 7 % 1000);
  return s.substr(0, kCluster);
}

// 16 guest clusters: text that compresses (A three times, B twice, C once),
// a byte fill (four times), zeros (twice: not stored), and noise that does
// not compress (E twice, F once: QEMU stores them plain).
std::string Input() {
  const std::string a = Text(1), b = Text(2), c = Text(3), d(kCluster, '\x11');
  const std::string e = images::RandomBytes(kCluster, 5), f = images::RandomBytes(kCluster, 6);
  const std::string zero(kCluster, '\0');
  std::string raw;
  for (const std::string* p : {&a, &b, &c, &d, &d, &a, &zero, &b, &zero, &a, &d, &d, &e, &e, &f, &zero}) raw += *p;
  return raw;
}

// Distinct non-zero clusters of a raw image.
uint64_t DistinctData(const std::string& raw) {
  std::set<std::string> seen;
  const std::string zero(kCluster, '\0');
  for (size_t at = 0; at < raw.size(); at += kCluster) {
    std::string c = raw.substr(at, kCluster);
    if (c != zero) seen.insert(std::move(c));
  }
  return seen.size();
}

// Distinct stored copies, by the L2 tables: compressed descriptors and
// plain host clusters.
struct Stored {
  uint64_t compressed = 0, plain = 0;
};
Stored CountStored(const std::string& img) {
  std::string error;
  const auto l = ReadQcow2Layout(img, &error);
  REQUIRE_MESSAGE(l.has_value(), error);
  std::set<uint64_t> comp, plain;
  for (uint64_t e : l->l2_entries) {
    if (e & Qcow2Layout::kCompressed) comp.insert(e & ~Qcow2Layout::kCopied);
    else if ((e & Qcow2Layout::kOffsetMask) && !(e & Qcow2Layout::kZero)) plain.insert(e & Qcow2Layout::kOffsetMask);
  }
  return {comp.size(), plain.size()};
}

RunResult Ours(const std::string& args) { return Run(Tool() + " " + args); }

nlohmann::json OurJson(const std::string& img, int want_exit) {
  const RunResult r = Ours("check --output=json " + Sh(img));
  INFO(r.out << r.err);
  CHECK(r.exit_code == want_exit);
  const nlohmann::json j = nlohmann::json::parse(r.out, nullptr, false);
  REQUIRE(j.is_object());
  return j;
}

void RequireTools() {
  RequireCommand("qemu-img");
  RequireCommand("qemu-io");
}

std::string QemuConvert(const TempDir& dir, const std::string& raw, const std::string& type) {
  const std::string img = dir / ("qemu-" + type + ".qcow2");
  MustRun("qemu-img convert -q -c -f raw -O qcow2 -o compression_type=" + type + " " + Sh(raw) + " " + Sh(img));
  return img;
}

// The compressed descriptor of guest cluster g, read from the image's bytes.
uint64_t Descriptor(const std::string& img, uint64_t g) {
  std::string error;
  const auto l = ReadQcow2Layout(img, &error);
  REQUIRE_MESSAGE(l.has_value(), error);
  REQUIRE(g < l->l2_entries.size());
  const uint64_t e = l->l2_entries[g];
  REQUIRE((e & Qcow2Layout::kCompressed));
  return e;
}

// The host offset of a compressed descriptor at 64 KiB clusters.
uint64_t HostOffset(uint64_t descriptor) {
  const uint32_t x = 62 - (16 - 8);
  return descriptor & ((1ull << x) - 1);
}

// Flips the first 16 bytes of the compressed stream at host offset at.
void FlipStream(const std::string& img, uint64_t at) {
  std::string bytes = images::ReadBytes(img).substr(at, 16);
  for (char& c : bytes) c = char(~c);
  images::PatchFile(img, at, bytes);
}

// ... that of guest cluster g; returns its host offset.
uint64_t DamageStream(const std::string& img, uint64_t g) {
  const uint64_t at = HostOffset(Descriptor(img, g));
  FlipStream(img, at);
  return at;
}

// qemu-io's read of the guest cluster fails: the data is gone for QEMU too.
void QemuCannotRead(const std::string& img, uint64_t g) {
  const RunResult r = Run(fmt::format("qemu-io -r -f qcow2 -c 'read {} {}' {}", g * kCluster, kCluster, Sh(img)));
  INFO(r.out << r.err);
  CHECK((r.exit_code != 0 || (r.out + r.err).find("read failed") != std::string::npos));
}

}  // namespace

TEST_CASE("qemu-img convert -c: every compressed cluster hashed, the repeated ones counted as duplicates") {
  RequireTools();
  TempDir dir;
  const std::string raw = dir / "input.raw";
  const std::string input = Input();
  images::WriteBytes(raw, input);
  const uint64_t distinct = DistinctData(input);
  for (std::string type : {"zlib", "zstd"}) {
    CAPTURE(type);
    const std::string img = QemuConvert(dir, raw, type);
    const Stored s = CountStored(img);
    // What the fixture is for: QEMU compressed the text and the fill, one
    // copy per guest cluster, and stored the noise plain.
    REQUIRE(s.compressed == 10);
    REQUIRE(s.plain == 3);
    CheckQemuClean(img);

    nlohmann::json d = OurJson(img, 0)["dedup"];
    CHECK(d["present"] == false);
    CHECK(d["compressed-clusters"].get<uint64_t>() == s.compressed);
    CHECK(d["stored-clusters"].get<uint64_t>() == s.plain);
    CHECK(d["duplicates"].get<uint64_t>() == s.compressed + s.plain - distinct);
    const RunResult human = Ours("check " + Sh(img));
    CHECK(human.exit_code == 0);
    CHECK(human.out.find(fmt::format("Dedup index: none; {} stored clusters and {} compressed ones, {} duplicate "
                                     "clusters\n",
                                     s.plain, s.compressed, s.compressed + s.plain - distinct)) != std::string::npos);

    // A plain copy of data that is stored compressed is a duplicate too.
    MustRun(fmt::format("qemu-io -f qcow2 -c 'write -P 0x11 {} {}' {}", 15 * kCluster, kCluster, Sh(img)));
    REQUIRE(CountStored(img).plain == s.plain + 1);
    d = OurJson(img, 0)["dedup"];
    CHECK(d["stored-clusters"].get<uint64_t>() == s.plain + 1);
    CHECK(d["compressed-clusters"].get<uint64_t>() == s.compressed);
    CHECK(d["duplicates"].get<uint64_t>() == s.compressed + s.plain + 1 - distinct);
  }
}

TEST_CASE("our convert -c: each distinct cluster hashed once, no duplicates") {
  RequireTools();
  TempDir dir;
  const std::string raw = dir / "input.raw";
  const std::string input = Input();
  images::WriteBytes(raw, input);
  const uint64_t distinct = DistinctData(input);
  for (std::string type : {"zlib", "zstd"}) {
    CAPTURE(type);
    const std::string img = dir / ("ours-" + type + ".qcow2");
    MustRun(Tool() + " convert -q -c -f raw -O qcow2 -o compression_type=" + type + " " + Sh(raw) + " " + Sh(img));
    const Stored s = CountStored(img);
    REQUIRE(s.compressed + s.plain == distinct);
    REQUIRE(s.compressed == 4);  // A, B, C and the fill; the noise is plain
    CheckQemuClean(img);
    const nlohmann::json d = OurJson(img, 0)["dedup"];
    CHECK(d["compressed-clusters"].get<uint64_t>() == s.compressed);
    CHECK(d["stored-clusters"].get<uint64_t>() == s.plain);
    CHECK(d["duplicates"] == 0);
  }
}

TEST_CASE("a damaged compressed stream: our finding names it, exit 2; qemu-img finds the structure intact") {
  RequireTools();
  TempDir dir;
  const std::string raw = dir / "input.raw";
  images::WriteBytes(raw, Input());
  for (std::string type : {"zlib", "zstd"}) {
    CAPTURE(type);
    const std::string img = QemuConvert(dir, raw, type);
    const uint64_t compressed = CountStored(img).compressed;
    const uint64_t g = 2;  // C, stored once
    const uint64_t host = DamageStream(img, g);
    QemuCannotRead(img, g);
    CheckQemuClean(img);

    const RunResult human = Ours("check " + Sh(img));
    const RunResult qemu = Run("qemu-img check -f qcow2 " + Sh(img));
    INFO("ours:\n" << human.out << human.err << "qemu-img:\n" << qemu.out << qemu.err);
    CHECK(human.exit_code == 2);
    CHECK(qemu.exit_code == 0);
    const std::string finding = fmt::format("ERROR compressed cluster at host offset {:#x} (guest offset {:#x}): ",
                                            host, g * kCluster);
    CHECK(human.err.rfind(finding, 0) == 0);
    CHECK(LineCount(human.err) == 1);
    CHECK(human.out.find("No errors were found in the qcow2 structure.\n") == 0);
    CHECK(human.out.find("\n1 compressed clusters do not decompress.\n") != std::string::npos);
    // qemu-img's part of our output is qemu-img's, and the exit code is the
    // judge's but for what only we found.
    const QcowPart ours = QcowPartOf(human.out, human.err, false), theirs = QcowPartOf(qemu.out, qemu.err, false);
    CHECK(ours.out == theirs.out);
    CHECK(ours.err == theirs.err);
    CHECK(ours.ours_found_more);
    CHECK(ExpectedCheckExit(qemu.exit_code, ours) == human.exit_code);

    const nlohmann::json j = OurJson(img, 2);
    CHECK(j["bad-compressed-clusters"] == 1);
    CHECK(j["dedup"]["compressed-clusters"].get<uint64_t>() == compressed - 1);
    CHECK(j.value("corruptions", 0) == 0);  // qemu-img's count: it reads no data

    // Nothing can mend it: -r all writes nothing and says so again.
    const std::string digest = images::FileDigest(img);
    const RunResult repair = Ours("check -r all " + Sh(img));
    CHECK(repair.exit_code == 2);
    CHECK(repair.err.rfind(finding, 0) == 0);
    CHECK(images::FileDigest(img) == digest);
  }
}

TEST_CASE("a damaged compressed stream only a snapshot still reads is found too") {
  RequireTools();
  TempDir dir;
  const std::string raw = dir / "input.raw";
  images::WriteBytes(raw, Input());
  const std::string img = QemuConvert(dir, raw, "zlib");
  const uint64_t g = 2;
  const uint64_t host = HostOffset(Descriptor(img, g));
  MustRun("qemu-img snapshot -c before " + Sh(img));
  MustRun(fmt::format("qemu-io -f qcow2 -c 'write -P 0x77 {} {}' {}", g * kCluster, kCluster, Sh(img)));
  FlipStream(img, host);
  CheckQemuClean(img);
  const RunResult r = Ours("check " + Sh(img));
  INFO(r.out << r.err);
  CHECK(r.exit_code == 2);
  CHECK(r.err == fmt::format("ERROR compressed cluster at host offset {:#x} (guest offset {:#x} in a snapshot): "
                             "compressed cluster does not inflate to a whole cluster\n",
                             host, g * kCluster));
  // The active view no longer holds it: its count is of the active copies.
  CHECK(r.out.find("Dedup index: none; 4 stored clusters and 9 compressed ones, ") != std::string::npos);
}
