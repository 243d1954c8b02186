// -o index_memory=SIZE through the CLI (convert, write, serve, dedup), with
// stock QEMU as the judge: under a cap the image still reads back exactly
// (qemu-img compare) and checks clean (qemu-img check); it stores more
// clusters than without the cap, and dedup-stats and check report as
// missed exactly what the definition (man page, "index_memory") says.
//
// The input: D distinct 4 KiB clusters, each written twice in a row. A
// 120 KiB cap holds `fits` entries (asked of the index itself): the first
// fits clusters stored are indexed; every later one is stored unindexed,
// and so is its second copy.
#include <doctest/doctest.h>

#include <fstream>
#include <random>
#include <string>

#include "dedup/index.h"
#include "support/numbered_digest.h"
#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

constexpr uint64_t kCs = 4096;
constexpr uint64_t kCap = 120 * 1024;
const std::string kCapOption = "index_memory=120K";

// What the index holds under the cap: its memory's bound for that many
// entries fits, whatever their fingerprints.
uint64_t EntriesUnder(uint64_t cap) {
  const uint64_t n = qcow2dedup::DedupIndex::EntriesWithin(cap);
  REQUIRE(qcow2dedup::DedupIndex::BoundBytes(n) <= cap);
  REQUIRE(qcow2dedup::DedupIndex::BoundBytes(n + 1) > cap);
  return n;
}

// D distinct clusters, each twice in a row.
void WritePairs(const std::string& path, uint64_t distinct) {
  std::ofstream out(path, std::ios::binary);
  std::vector<char> c(kCs);
  for (uint64_t i = 0; i < distinct; ++i) {
    std::mt19937_64 rng(i + 1);
    for (auto& b : c) b = char(rng());
    out.write(c.data(), long(c.size()));
    out.write(c.data(), long(c.size()));
  }
}

nlohmann::json RunJson(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  return nlohmann::json::parse(r.out);
}

void MustRun(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

struct Report {
  uint64_t stored, misses, check_misses, duplicates;
};

// dedup-stats and check, which must agree on the misses; the image judged clean.
Report Judge(const std::string& image, const std::string& raw) {
  CheckQemuClean(image);
  CheckQemuIdentical(image, raw);
  const nlohmann::json stats = RunJson(Tool() + " dedup-stats --output=json " + Sh(image));
  const nlohmann::json check = RunJson(Tool() + " check --output=json " + Sh(image));
  Report r{stats["stored-clusters"].get<uint64_t>(), stats["memory-misses"].get<uint64_t>(),
           check["dedup"]["memory-misses"].get<uint64_t>(), check["dedup"]["duplicates"].get<uint64_t>()};
  CHECK(r.misses == r.check_misses);
  return r;
}

}  // namespace

TEST_CASE("convert, write and serve under index_memory: exact data, more clusters, the misses reported") {
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  const uint64_t fits = EntriesUnder(kCap);
  REQUIRE(fits > 100);
  const uint64_t distinct = fits + 600;
  TempDir dir;
  const std::string raw = dir / "pairs.raw";
  WritePairs(raw, distinct);

  const std::string free_img = dir / "free.qcow2";
  MustRun(Tool() + " convert -o cluster_size=4K " + Sh(raw) + " " + Sh(free_img));
  const Report free = Judge(free_img, raw);
  CHECK(free.stored == distinct);
  CHECK(free.misses == 0);
  CHECK(free.duplicates == 0);

  // Every cluster stored is either one of the fits indexed or a miss; the
  // clusters stored past the cap without a twin are the misses' other half.
  auto check_capped = [&](const std::string& image) {
    const Report capped = Judge(image, raw);
    const uint64_t extra = capped.stored - free.stored;
    CHECK(extra == distinct - fits);
    CHECK(capped.misses == capped.stored - fits);
    CHECK(capped.misses == 2 * extra);
    CHECK(capped.duplicates == extra);
  };
  SUBCASE("convert") {
    const std::string img = dir / "capped.qcow2";
    MustRun(Tool() + " convert -o cluster_size=4K," + kCapOption + " " + Sh(raw) + " " + Sh(img));
    check_capped(img);
    // A later session without a cap rebuilds the whole index: the data
    // written again is linked, and the misses stay until a dedup.
    MustRun(Tool() + " write --input " + Sh(raw) + " " + Sh(img) + " 0");
    const Report after = Judge(img, raw);
    CHECK(after.misses == distinct - fits + distinct - fits);
    nlohmann::json d = RunJson(Tool() + " dedup --output=json " + Sh(img));
    CHECK(d["memory-misses"] == 0);
    const Report deduped = Judge(img, raw);
    CHECK(deduped.stored == distinct);
    CHECK(deduped.misses == 0);
  }
  SUBCASE("write") {
    const std::string img = dir / "written.qcow2";
    MustRun(Tool() + " create -q -o cluster_size=4K " + Sh(img) + " " + std::to_string(2 * distinct * kCs));
    MustRun(Tool() + " write -o " + kCapOption + " --input " + Sh(raw) + " " + Sh(img) + " 0");
    check_capped(img);
  }
  SUBCASE("convert -n") {
    const std::string img = dir / "existing.qcow2";
    MustRun(Tool() + " create -q -o cluster_size=4K " + Sh(img) + " " + std::to_string(2 * distinct * kCs));
    MustRun(Tool() + " convert -n -o " + kCapOption + " " + Sh(raw) + " " + Sh(img));
    check_capped(img);
  }
  SUBCASE("serve") {
    REQUIRE_MESSAGE(HaveCommand("nbdkit"), "nbdkit is missing: install nbdkit");
    const std::string img = dir / "served.qcow2";
    MustRun(Tool() + " create -q -o cluster_size=4K " + Sh(img) + " " + std::to_string(2 * distinct * kCs));
    // qemu-img writes in parallel, in no fixed order: which clusters are
    // indexed differs, but not how many, nor that each stored one is either.
    MustRun(Tool() + " serve -o " + kCapOption + " --run " +
            Sh("qemu-img convert -n -f raw -O raw " + Sh(raw) + " \"$uri\"") + " " + Sh(img));
    const Report capped = Judge(img, raw);
    CHECK(capped.stored > free.stored);
    CHECK(capped.misses == capped.stored - fits);
    CHECK(capped.misses >= capped.duplicates);
    CHECK(capped.duplicates == capped.stored - free.stored);
  }
}

TEST_CASE("dedup under index_memory: what the index holds is linked, what it left out is reported") {
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  const uint64_t fits = EntriesUnder(kCap);
  const uint64_t distinct = fits + 400;
  TempDir dir;
  const std::string raw = dir / "pairs.raw", img = dir / "q.qcow2";
  WritePairs(raw, distinct);
  MustRun("qemu-img convert -f raw -O qcow2 -o cluster_size=4096 " + Sh(raw) + " " + Sh(img));
  nlohmann::json d = RunJson(Tool() + " dedup -o " + kCapOption + " --output=json " + Sh(img));
  // qemu-img stores the clusters in guest order: the index holds the first
  // fits of them (fits / 2 pairs), links those, and leaves the rest.
  CHECK(d["stored-clusters-before"] == 2 * distinct);
  CHECK(d["memory-misses"] == 2 * distinct - fits);
  CHECK(d["relinked-clusters"] == fits / 2);
  CHECK(d["stored-clusters-after"] == 2 * distinct - fits / 2);
  const Report r = Judge(img, raw);
  CHECK(r.stored == 2 * distinct - fits / 2);
  CHECK(r.misses == 2 * distinct - fits);
  CHECK(r.duplicates == distinct - fits / 2);
  // Without the cap, the rest goes too.
  d = RunJson(Tool() + " dedup --output=json " + Sh(img));
  CHECK(d["memory-misses"] == 0);
  CHECK(d["stored-clusters-after"] == distinct);
  const Report full = Judge(img, raw);
  CHECK(full.misses == 0);
  CHECK(full.duplicates == 0);
}

TEST_CASE("index_memory: a bad value is one line naming the option and the value; -o help lists it") {
  TempDir dir;
  const std::string raw = dir / "a.raw", img = dir / "a.qcow2";
  WritePairs(raw, 4);
  MustRun(Tool() + " create -q " + Sh(img) + " 1M");
  for (const std::string& cmd :
       {Tool() + " convert -o index_memory=lots " + Sh(raw) + " " + Sh(dir / "b.qcow2"),
        Tool() + " convert -o index_memory=0 " + Sh(raw) + " " + Sh(dir / "b.qcow2"),
        Tool() + " write -o index_memory=12Q --pattern 1 --length 4K " + Sh(img) + " 0",
        Tool() + " dedup -o index_memory= " + Sh(img),
        Tool() + " serve -o index_memory=-1 --run true " + Sh(img)}) {
    RunResult r = Run(cmd);
    INFO(cmd << "\n" << r.err);
    CHECK(r.exit_code == 1);
    CHECK(LineCount(r.err) == 1);
    CHECK(r.err.find("'index_memory'") != std::string::npos);
    CHECK(r.out.empty());
  }
  CHECK(!std::ifstream(dir / "b.qcow2"));  // nothing created
  RunResult r = Run(Tool() + " write -o cluster_size=4K --pattern 1 --length 4K " + Sh(img) + " 0");
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("invalid parameter 'cluster_size'") != std::string::npos);
  r = Run(Tool() + " create -o index_memory=1M " + Sh(dir / "c.qcow2") + " 1M");
  CHECK(r.exit_code == 1);  // create writes no data: nothing to index
  for (const char* sub : {"convert", "write", "serve", "dedup"}) {
    r = Run(Tool() + " " + sub + " -o help");
    INFO(sub << ": " << r.out << r.err);
    CHECK(r.exit_code == 0);
    CHECK(r.out.find("index_memory=<size>") != std::string::npos);
  }
}
