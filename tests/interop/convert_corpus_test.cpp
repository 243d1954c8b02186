// convert on real disk data: the corpus that shared/corpus/make-corpus.sh
// builds (QCOW2DEDUP_CORPUS names its directory; it must hold vmfarm.raw).
// At 4K and 64K clusters the image must be identical to the disk for
// qemu-img compare, clean for qemu-img check, store exactly the clusters
// the independent oracle (shared/oracle/dedup_oracle.py) counts, by our
// info and by our own reading of the L2 tables, keep its metadata small,
// and convert back to raw byte for byte.
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>

#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool IsFile(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string CorpusDir() {
  const char* env = std::getenv("QCOW2DEDUP_CORPUS");
  REQUIRE_MESSAGE((env && *env),
                  "QCOW2DEDUP_CORPUS is not set: point it at the directory that "
                  "../shared/corpus/make-corpus.sh built (it holds vmfarm.raw and vm-a.raw), "
                  "e.g. QCOW2DEDUP_CORPUS=/work/corpus");
  const std::string dir = env;
  REQUIRE_MESSAGE(IsFile(dir + "/vmfarm.raw"), "QCOW2DEDUP_CORPUS=" << dir
                                                   << " has no vmfarm.raw: build the corpus with "
                                                      "../shared/corpus/make-corpus.sh "
                                                   << dir);
  return dir;
}

}  // namespace

TEST_CASE("convert the vmfarm corpus at 4K and 64K clusters") {
  REQUIRE(HaveCommand("qemu-img"));
  REQUIRE(HaveCommand("python3"));
  const std::string corpus = CorpusDir();
  const std::string disk = corpus + "/vmfarm.raw";
  const uint64_t disk_size = FileSize(disk);
  TempDir dir;

  // The oracle reads 3 GiB twice; it runs beside the conversions.
  const std::string oracle = QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py";
  REQUIRE_MESSAGE(IsFile(oracle), "the dedup oracle is missing: " << oracle);
  const auto t_oracle = std::chrono::steady_clock::now();
  BackgroundProcess oracle_run("python3 " + Sh(oracle) + " " + Sh(disk) + " 4096 65536 >" + Sh(dir / "oracle.json") +
                               " 2>" + Sh(dir / "oracle.err"));
  std::map<uint64_t, nlohmann::json> expected;
  double oracle_seconds = 0;
  auto oracle_result = [&](uint64_t cs) -> const nlohmann::json& {
    if (expected.empty()) {
      const int rc = oracle_run.Wait(900);
      oracle_seconds = Seconds(t_oracle);
      INFO("oracle stderr: " << ReadFileBytes(dir / "oracle.err"));
      REQUIRE(rc == 0);
      std::istringstream lines(ReadFileBytes(dir / "oracle.json"));
      for (std::string line; std::getline(lines, line);) {
        if (line.empty()) continue;
        nlohmann::json j = nlohmann::json::parse(line);
        expected[j["cluster_size"].get<uint64_t>()] = j;
      }
      MESSAGE("oracle: " << oracle_seconds << " s");
    }
    REQUIRE(expected.count(cs));
    return expected.at(cs);
  };

  for (uint64_t cs : {uint64_t(65536), uint64_t(4096)}) {
    CAPTURE(cs);
    const std::string out = dir / ("vmfarm-" + std::to_string(cs) + ".qcow2");
    const std::string back = dir / ("vmfarm-" + std::to_string(cs) + ".raw");

    auto t0 = std::chrono::steady_clock::now();
    RunResult r = Run(Tool() + " convert -O qcow2 -o cluster_size=" + std::to_string(cs) + " " + Sh(disk) + " " +
                      Sh(out));
    const double convert_s = Seconds(t0);
    INFO("convert: " << r.out << r.err);
    REQUIRE(r.exit_code == 0);

    t0 = std::chrono::steady_clock::now();
    CheckQemuIdentical(out, disk);
    const double compare_s = Seconds(t0);
    t0 = std::chrono::steady_clock::now();
    QemuCheckResult c = QemuImgCheck(out);
    const double check_s = Seconds(t0);
    {
      INFO("qemu-img check: " << c.out << c.err);
      CHECK(c.exit_code == 0);
      REQUIRE(c.json.is_object());
      CHECK(c.Get("check-errors") == 0);
      CHECK(c.Get("leaks") == 0);
      CHECK(c.Get("corruptions") == 0);
    }
    nlohmann::json qinfo = QemuImgInfo(out);
    REQUIRE(qinfo.is_object());
    CHECK(qinfo["virtual-size"] == (disk_size + 511) / 512 * 512);
    CHECK(qinfo["cluster-size"] == cs);

    // What optimal dedup stores, three ways: the oracle, our info, our reading.
    const nlohmann::json& want = oracle_result(cs);
    const uint64_t unique = want["unique"].get<uint64_t>();
    const uint64_t nonzero = want["nonzero"].get<uint64_t>();
    r = Run(Tool() + " info --output=json " + Sh(out));
    INFO("info: " << r.out << r.err);
    REQUIRE(r.exit_code == 0);
    nlohmann::json info = nlohmann::json::parse(r.out, nullptr, false);
    REQUIRE(info.is_object());
    CHECK(info["dedup"]["in-sync"] == true);
    CHECK(info["dedup"]["stored-clusters"] == unique);

    std::string err;
    auto layout = ReadQcow2Layout(out, &err);
    REQUIRE_MESSAGE(layout.has_value(), err);
    const Qcow2Layout& l = *layout;
    INFO("layout problems: " << (l.problems.empty() ? "none" : l.problems.front()));
    CHECK(l.refcount_mismatches == 0);
    CHECK(l.copied_mismatches == 0);
    CHECK(l.stored_data_clusters() == unique);
    CHECK(l.data_references() == nonzero);  // zero clusters stay unallocated
    CHECK(l.zero_alloc_refs.empty());
    CHECK(l.compressed_entries == 0);

    // Metadata: everything in the file that is not stored data.
    const uint64_t file_size = FileSize(out);
    const uint64_t metadata = file_size - l.stored_data_clusters() * cs;
    const uint64_t tables = (l.l2_tables.size() + l.refblocks.size() + l.reftable_clusters) * cs +
                            (uint64_t(l.l1_size) * 8 + cs - 1) / cs * cs;
    const uint64_t index_bytes = l.dedup_index_entries * 32;
    const double percent = 100.0 * double(metadata) / double(l.virtual_size);
    if (cs == 65536) CHECK_MESSAGE(percent < 1.0, "metadata is " << percent << "% of the virtual size");

    // And back to raw, byte for byte.
    t0 = std::chrono::steady_clock::now();
    r = Run(Tool() + " convert -O raw " + Sh(out) + " " + Sh(back));
    const double to_raw_s = Seconds(t0);
    INFO("convert -O raw: " << r.out << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(FileSize(back) == disk_size);
    t0 = std::chrono::steady_clock::now();
    r = Run("cmp " + Sh(back) + " " + Sh(disk));
    const double cmp_s = Seconds(t0);
    INFO("cmp: " << r.out << r.err);
    CHECK(r.exit_code == 0);

    MESSAGE("cluster size " << cs << ": stored " << l.stored_data_clusters() << " (oracle unique " << unique
                            << ", nonzero " << nonzero << "), file " << file_size << " bytes, metadata " << metadata
                            << " bytes = " << percent << "% of virtual (tables " << tables << ", index "
                            << index_bytes << "); convert " << convert_s << " s, qemu-img compare " << compare_s
                            << " s, check " << check_s << " s, convert -O raw " << to_raw_s << " s, cmp " << cmp_s
                            << " s");
    ::unlink(out.c_str());
    ::unlink(back.c_str());
  }
}
