// dedup-stats and --simulate on real disks (the corpus that
// ../shared/corpus/make-corpus.sh builds), judged by the independent oracle.
// QCOW2DEDUP_CORPUS names the corpus directory; without it the test fails:
// a judge that silently passes is no judge.
#include <doctest/doctest.h>

#include "dedup/index_table.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "qcow2dedup/convert.h"
#include "qcow2dedup/stats.h"
#include "support/process.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::Run;
using testing::Sh;
using testing::TempDir;

namespace {

const std::vector<uint64_t> kSimulated = {4096, 16384, 65536};
const std::vector<uint64_t> kConverted = {4096, 65536};

struct Expected {
  uint64_t clusters = 0, nonzero = 0, unique = 0;
};

std::string CorpusDisk(const std::string& name) {
  const char* dir = std::getenv("QCOW2DEDUP_CORPUS");
  REQUIRE_MESSAGE((dir && *dir),
                  "QCOW2DEDUP_CORPUS is not set: build the corpus with ../shared/corpus/make-corpus.sh DIR "
                  "and run the test with QCOW2DEDUP_CORPUS=DIR");
  const std::string path = std::string(dir) + "/" + name;
  REQUIRE_MESSAGE(std::filesystem::is_regular_file(path),
                  path << " is missing: build the corpus with ../shared/corpus/make-corpus.sh " << dir);
  return path;
}

// Runs the oracle (single-threaded Python, I/O bound) beside our own work.
std::future<std::map<uint64_t, Expected>> StartOracle(const std::string& raw, const std::vector<uint64_t>& sizes) {
  std::string cmd = "python3 " + Sh(QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py") + " " + Sh(raw);
  for (uint64_t cs : sizes) cmd += " " + std::to_string(cs);
  return std::async(std::launch::async, [cmd] {
    auto r = Run(cmd);
    std::map<uint64_t, Expected> out;
    if (r.exit_code != 0) return out;
    std::istringstream lines(r.out);
    for (std::string line; std::getline(lines, line);) {
      auto j = nlohmann::json::parse(line);
      out[j["cluster_size"]] = {j["clusters"], j["nonzero"], j["unique"]};
    }
    return out;
  });
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

void CheckDisk(const std::string& name) {
  const std::string raw = CorpusDisk(name);
  std::vector<uint64_t> sizes = kSimulated;
  auto oracle_run = StartOracle(raw, sizes);
  TempDir dir;

  auto src_r = OpenBlockDevice(raw, ImageFormat::kRaw);
  REQUIRE_MESSAGE(src_r.ok(), src_r.status().message());
  auto src = std::move(src_r).value();

  auto t = std::chrono::steady_clock::now();
  auto sim_r = SimulateDedup(*src, kSimulated);
  REQUIRE_MESSAGE(sim_r.ok(), sim_r.status().message());
  const auto sims = std::move(sim_r).value();
  MESSAGE(name << ": simulate 4K/16K/64K took " << Seconds(t) << " s");

  std::map<uint64_t, DedupStats> stats;
  std::map<uint64_t, uint64_t> file_sizes;
  for (uint64_t cs : kConverted) {
    const std::string image = dir / (std::to_string(cs) + ".qcow2");
    t = std::chrono::steady_clock::now();
    {
      CreateOptions o;
      o.virtual_size = src->virtual_size();
      o.cluster_size = uint32_t(cs);
      auto img = Image::Create(image, o);
      REQUIRE_MESSAGE(img.ok(), img.status().message());
      Status st = CopyInto(*src, **img);
      REQUIRE_MESSAGE(st.ok(), st.message());
      st = (*img)->Close();
      REQUIRE_MESSAGE(st.ok(), st.message());
    }
    MESSAGE(name << ": convert at " << cs << " took " << Seconds(t) << " s");
    t = std::chrono::steady_clock::now();
    auto s = ComputeDedupStats(image, 10, false);
    REQUIRE_MESSAGE(s.ok(), s.status().message());
    MESSAGE(name << ": dedup-stats at " << cs << " took " << Seconds(t) << " s");
    stats[cs] = std::move(s).value();
    file_sizes[cs] = std::filesystem::file_size(image);
    std::filesystem::remove(image);
  }

  t = std::chrono::steady_clock::now();
  const auto oracle = oracle_run.get();
  MESSAGE(name << ": waited " << Seconds(t) << " s more for the oracle");
  REQUIRE_MESSAGE(oracle.size() == sizes.size(), "the oracle failed on " << raw);

  for (size_t i = 0; i < kSimulated.size(); ++i) {
    const uint64_t cs = kSimulated[i];
    const Expected& want = oracle.at(cs);
    CAPTURE(name);
    CAPTURE(cs);
    MESSAGE(name << " at " << cs << ": clusters " << want.clusters << ", nonzero " << want.nonzero << ", unique "
                 << want.unique << "; estimated image " << sims[i].estimated_image_size);
    CHECK(sims[i].cluster_size == cs);
    CHECK(sims[i].clusters == want.clusters);
    CHECK(sims[i].nonzero == want.nonzero);
    CHECK(sims[i].unique == want.unique);
  }
  for (uint64_t cs : kConverted) {
    const DedupStats& s = stats[cs];
    const Expected& want = oracle.at(cs);
    CAPTURE(name);
    CAPTURE(cs);
    CHECK(s.guest_clusters == want.clusters);
    CHECK(s.data_clusters == want.nonzero);
    CHECK(s.stored_clusters == want.unique);
    CHECK(s.data_clusters + s.zero_clusters + s.backing_clusters == s.guest_clusters);
    uint64_t stored = 0, refs = 0;
    for (const auto& b : s.histogram) {
      stored += b.stored_clusters;
      refs += b.references;
    }
    CHECK(stored == s.stored_clusters);
    CHECK(refs == s.data_clusters);
    CHECK(s.metadata.index == IndexTableBytes(IndexBucketsFor(want.unique)));
    // The estimate is the size convert made.
    const size_t i = std::find(kSimulated.begin(), kSimulated.end(), cs) - kSimulated.begin();
    CHECK(sims[i].estimated_image_size == file_sizes[cs]);
  }
}

}  // namespace

TEST_CASE("stats and simulation of a single VM disk match the oracle") { CheckDisk("vm-a.raw"); }

TEST_CASE("stats and simulation of a disk of four VMs match the oracle") { CheckDisk("vmfarm.raw"); }
