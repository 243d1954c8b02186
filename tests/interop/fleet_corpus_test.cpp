// dedup-stats --simulate over a fleet of real VM disks (the corpus that
// ../shared/corpus/make-corpus.sh builds: part-a.img the template, part-a2,
// part-b and part-c other VMs), judged by the independent oracle:
//   each alone       = the oracle on that image
//   all together     = the oracle on the images concatenated (700 MiB
//                      each, whole clusters: the concatenation's clusters
//                      are the images' clusters)
//   overlay on base  = the oracle on a copy of the image with every cluster
//                      equal to the base's at the same offset zeroed
// QCOW2DEDUP_CORPUS names the corpus directory; without it the test fails.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>
#include <vector>

#include "support/process.h"
#include "support/temp_dir.h"

using testing::Run;
using testing::Sh;
using testing::TempDir;

namespace {

constexpr uint64_t kCluster = 64 << 10;
const std::vector<std::string> kImages = {"part-a.img", "part-a2.img", "part-b.img", "part-c.img"};
const std::string kBase = "part-a.img";

struct Counts {
  uint64_t clusters = 0, nonzero = 0, unique = 0;
  std::string error;  // the oracle failed: what it said
};

std::string CorpusDir() {
  const char* dir = std::getenv("QCOW2DEDUP_CORPUS");
  REQUIRE_MESSAGE((dir && *dir),
                  "QCOW2DEDUP_CORPUS is not set: build the corpus with ../shared/corpus/make-corpus.sh DIR "
                  "and run the test with QCOW2DEDUP_CORPUS=DIR");
  for (const std::string& name : kImages)
    REQUIRE_MESSAGE(std::filesystem::is_regular_file(std::string(dir) + "/" + name),
                    dir << "/" << name << " is missing: build the corpus with ../shared/corpus/make-corpus.sh");
  return dir;
}

// The oracle on what the shell words input name (a file, or /dev/stdin fed
// by a pipe in front), at 64 KiB; started now, read with Get().
std::future<Counts> Oracle(const std::string& input, const std::string& feed = "") {
  const std::string cmd = "set -o pipefail; " + feed + "python3 " +
                          Sh(QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py") + " " + input + " " +
                          std::to_string(kCluster);
  return std::async(std::launch::async, [cmd] {
    auto r = Run("bash -c " + Sh(cmd));
    if (r.exit_code != 0) return Counts{0, 0, 0, cmd + ": " + r.err};
    auto j = nlohmann::json::parse(r.out);
    return Counts{j["clusters"], j["nonzero"], j["unique"], ""};
  });
}

Counts Get(std::future<Counts>&& f) {
  Counts c = f.get();
  REQUIRE_MESSAGE(c.error.empty(), "the oracle failed: " << c.error);
  return c;
}

// A copy of image with the clusters equal to base's at the same offset
// zeroed (left as holes), as an overlay on base sees its own data.
void WriteDifference(const std::string& image, const std::string& base, const std::string& out) {
  const int in = ::open(image.c_str(), O_RDONLY), b = ::open(base.c_str(), O_RDONLY);
  const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  REQUIRE((in >= 0 && b >= 0 && o >= 0));
  std::vector<char> ci(kCluster), cb(kCluster);
  uint64_t off = 0;
  for (;;) {
    const ssize_t n = ::pread(in, ci.data(), kCluster, off);
    REQUIRE(n >= 0);
    if (n == 0) break;
    const ssize_t m = ::pread(b, cb.data(), n, off);
    REQUIRE(m >= 0);
    std::memset(cb.data() + m, 0, n - m);  // past the base's end it reads as zeros
    if (std::memcmp(ci.data(), cb.data(), n) != 0) REQUIRE(::pwrite(o, ci.data(), n, off) == n);
    off += n;
  }
  REQUIRE(::ftruncate(o, off) == 0);
  ::close(in), ::close(b), ::close(o);
}

}  // namespace

TEST_CASE("dedup-stats --simulate over four VM disks, alone, together and as overlays, matches the oracle") {
  const std::string dir = CorpusDir();
  TempDir tmp;
  std::vector<std::string> paths;
  std::string words;
  for (const std::string& name : kImages) {
    paths.push_back(dir + "/" + name);
    words += " " + Sh(paths.back());
  }
  const std::string base = dir + "/" + kBase;

  // The longest oracle run beside ours; the others after it (two cores).
  auto together_run = Oracle("/dev/stdin", "cat" + words + " | ");
  auto r = Run(testing::Tool() + " dedup-stats --simulate --cluster-sizes 64K --output=json --base " + Sh(base) +
               words);
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  const auto j = nlohmann::json::parse(r.out);

  std::vector<Counts> alone, overlay;
  for (const std::string& p : paths) alone.push_back(Get(Oracle(Sh(p))));
  const Counts together = Get(std::move(together_run));
  for (size_t i = 0; i < paths.size(); ++i) {
    const std::string diff = tmp / ("overlay-" + std::to_string(i) + ".raw");
    WriteDifference(paths[i], base, diff);
    overlay.push_back(Get(Oracle(Sh(diff))));
    std::filesystem::remove(diff);
  }

  REQUIRE(j["simulations"].size() == 1);
  const auto& sim = j["simulations"][0];
  CHECK(sim["cluster-size"] == kCluster);
  REQUIRE(sim["images"].size() == kImages.size());
  uint64_t alone_sum = 0, overlay_sum = 0;
  for (size_t i = 0; i < kImages.size(); ++i) {
    const auto& img = sim["images"][i];
    CAPTURE(kImages[i]);
    CHECK(img["filename"] == paths[i]);
    CHECK(img["clusters"] == alone[i].clusters);
    CHECK(img["nonzero"] == alone[i].nonzero);
    CHECK(img["unique"] == alone[i].unique);
    CHECK(img["overlay"]["differing"] == overlay[i].nonzero);
    CHECK(img["overlay"]["unique"] == overlay[i].unique);
    alone_sum += alone[i].unique;
    overlay_sum += overlay[i].unique;
    MESSAGE(kImages[i] << ": " << alone[i].nonzero << " non-zero, " << alone[i].unique << " alone, "
                       << overlay[i].nonzero << " differ from the base, " << overlay[i].unique << " in an overlay");
  }
  CHECK(sim["alone-unique"] == alone_sum);
  CHECK(sim["together-nonzero"] == together.nonzero);
  CHECK(sim["together-unique"] == together.unique);
  CHECK(sim["base"]["unique"] == alone[0].unique);
  CHECK(sim["overlays-unique"] == overlay_sum);
  CHECK(sim["base-and-overlays-unique"] == alone[0].unique + overlay_sum);
  MESSAGE("alone " << alone_sum << ", together " << together.unique << ", base and overlays "
                   << alone[0].unique + overlay_sum << " clusters of 64 KiB");
  // The corpus shares data between its VMs, so the three layouts differ:
  // the counts above are not all the same sum.
  CHECK(overlay[0].nonzero == 0);  // the base over itself differs nowhere
  CHECK(together.unique < alone_sum);
  CHECK(overlay_sum < alone_sum - alone[0].unique);
}
