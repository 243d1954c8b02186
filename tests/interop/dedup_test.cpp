// `dedup` in place on images QEMU wrote: the corpus converted by qemu-img
// at 4K and 64K clusters must afterwards compare identical to the disk, be
// clean for qemu-img check, store exactly the clusters the independent
// oracle counts, and use no more disk than its data and metadata (+5%).
// Also: a small image with zeros stored as data, and the JSON report.
// (lock_test: dedup refuses an image QEMU holds.)
#include <doctest/doctest.h>

#include <sys/stat.h>

#include <cstdlib>
#include <map>
#include <sstream>

#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

uint64_t DiskUsage(const std::string& path) {
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return uint64_t(st.st_blocks) * 512;
}

nlohmann::json RunJson(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  return nlohmann::json::parse(r.out);
}

std::string Corpus() {
  const char* env = std::getenv("QCOW2DEDUP_CORPUS");
  REQUIRE_MESSAGE((env && *env), "QCOW2DEDUP_CORPUS is not set: build the corpus with ../shared/corpus/make-corpus.sh");
  return env;
}

}  // namespace

TEST_CASE("dedup of a small QEMU-written image: duplicates and stored zeros go, data stays") {
  REQUIRE_MESSAGE(HaveCommand("qemu-io"), "qemu-io is missing: install qemu-utils");
  TempDir dir;
  const std::string img = dir / "q.qcow2", raw = dir / "q.raw";
  REQUIRE(Run("qemu-img create -q -f qcow2 -o cluster_size=4096 " + Sh(img) + " 4M").exit_code == 0);
  // The same 64 KiB written four times, 16 KiB of zeros written as data, one unique run.
  REQUIRE(Run("qemu-io -c 'write -P 0x5a 0 64k' -c 'write -P 0x5a 1M 64k' -c 'write -P 0x5a 2M 64k' "
              "-c 'write -P 0x5a 3M 64k' -c 'write -P 0 512k 16k' -c 'write -P 0x17 600k 8k' " + Sh(img))
              .exit_code == 0);
  REQUIRE(Run("qemu-img convert -O raw " + Sh(img) + " " + Sh(raw)).exit_code == 0);
  const uint64_t before = DiskUsage(img);
  // dedup-stats says beforehand what dedup frees.
  CHECK(RunJson(Tool() + " dedup-stats --output=json " + Sh(img))["reclaimable-clusters"] == 68);
  nlohmann::json r = RunJson(Tool() + " dedup --output=json " + Sh(img));
  // 16 + 16*3 + 4 + 2 data clusters, all 0x5a clusters alike: 1 + 1 (0x17) stored.
  CHECK(r["stored-clusters-before"] == 70);
  CHECK(r["stored-clusters-after"] == 2);
  CHECK(r["zero-clusters"] == 4);
  CHECK(r["relinked-clusters"] == 64 + 1 - 1);
  CHECK(r["freed-clusters"] == 68);
  CHECK(r["disk-usage-after"].get<uint64_t>() < r["disk-usage-before"].get<uint64_t>());
  CHECK(DiskUsage(img) <= before - 60 * 4096);
  CheckQemuClean(img);
  CheckQemuIdentical(img, raw);
  // Done twice, nothing more to do.
  nlohmann::json again = RunJson(Tool() + " dedup --output=json " + Sh(img));
  CHECK(again["freed-clusters"] == 0);
  CHECK(again["relinked-clusters"] == 0);
  CheckQemuIdentical(img, raw);
  // Our check agrees: clean, and the index in sync.
  RunResult c = Run(Tool() + " check " + Sh(img));
  CHECK_MESSAGE(c.exit_code == 0, c.out, c.err);
}

TEST_CASE("dedup of the corpus as qemu-img converted it, at 4K and 64K clusters: the oracle's count") {
  REQUIRE_MESSAGE(HaveCommand("qemu-img"), "qemu-img is missing: install qemu-utils");
  const std::string disk = Corpus() + "/vmfarm.raw";
  TempDir dir;
  const std::string oracle = QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py";
  BackgroundProcess oracle_run("python3 " + Sh(oracle) + " " + Sh(disk) + " 4096 65536 >" + Sh(dir / "oracle.json") +
                               " 2>" + Sh(dir / "oracle.err"));
  std::map<uint64_t, uint64_t> unique;
  for (uint64_t cs : {uint64_t(65536), uint64_t(4096)}) {
    CAPTURE(cs);
    const std::string img = dir / ("vmfarm-" + std::to_string(cs) + ".qcow2");
    REQUIRE(Run("qemu-img convert -O qcow2 -o cluster_size=" + std::to_string(cs) + " " + Sh(disk) + " " + Sh(img))
                .exit_code == 0);
    const uint64_t before = DiskUsage(img);
    const uint64_t reclaimable = RunJson(Tool() + " dedup-stats --output=json " + Sh(img))["reclaimable-clusters"];
    nlohmann::json r = RunJson(Tool() + " dedup --output=json " + Sh(img));
    CHECK(r["freed-clusters"].get<uint64_t>() == reclaimable);
    if (unique.empty()) {
      REQUIRE(oracle_run.Wait(900) == 0);
      std::istringstream lines(ReadFileBytes(dir / "oracle.json"));
      for (std::string line; std::getline(lines, line);)
        if (!line.empty()) {
          auto j = nlohmann::json::parse(line);
          unique[j["cluster_size"].get<uint64_t>()] = j["unique"].get<uint64_t>();
        }
    }
    REQUIRE(unique.count(cs));
    CHECK(r["stored-clusters-after"].get<uint64_t>() == unique[cs]);
    CheckQemuClean(img);
    CheckQemuIdentical(img, disk);
    nlohmann::json stats = RunJson(Tool() + " dedup-stats --output=json " + Sh(img));
    CHECK(stats["stored-clusters"].get<uint64_t>() == unique[cs]);
    CHECK(stats["reclaimable-clusters"] == 0);
    const uint64_t data = unique[cs] * cs + stats["metadata-bytes"]["total"].get<uint64_t>();
    const uint64_t du = DiskUsage(img);
    MESSAGE("dedup at ", cs, ": disk usage ", before, " -> ", du, " bytes; data + metadata ", data);
    CHECK(du <= data + data / 20);
  }
}
