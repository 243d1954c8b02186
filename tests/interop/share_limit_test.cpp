// The share limit: the write path gives one stored cluster at most
// ShareLimit(refcount_bits) references (half the largest refcount, room for
// a snapshot to double it), then stores another copy; qemu-img map counts
// the references. create and convert warn exactly when nothing is shared.
#include <doctest/doctest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "qcow2dedup/share_limit.h"
#include "support/process.h"
#include "support/qemu_tools.h"
#include "support/require_command.h"
#include "support/temp_dir.h"

using namespace testing;
using qcow2dedup::ShareLimit;

namespace {

// References to each host cluster from the guest's view, per qemu-img map.
std::map<uint64_t, uint64_t> References(const std::string& img, uint64_t cs) {
  RunResult r = Run("qemu-img map -f qcow2 --output=json " + Sh(img));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  std::map<uint64_t, uint64_t> refs;
  for (const auto& e : nlohmann::json::parse(r.out)) {
    if (!e["data"].get<bool>() || !e.contains("offset")) continue;
    const uint64_t off = e["offset"], len = e["length"];
    for (uint64_t b = 0; b < len; b += cs) ++refs[off + b];
  }
  return refs;
}

}  // namespace

TEST_CASE("ShareLimit: half the largest refcount, at least 1") {
  CHECK(ShareLimit(1) == 1);
  CHECK(ShareLimit(2) == 1);
  CHECK(ShareLimit(4) == 7);
  CHECK(ShareLimit(8) == 127);
  CHECK(ShareLimit(16) == 32767);
  CHECK(ShareLimit(32) == 2147483647ull);
  CHECK(ShareLimit(64) == 0x7fffffffffffffffull);
}

TEST_CASE("the writer shares a cluster up to ShareLimit, then stores another copy") {
  RequireCommand("qemu-img");
  TempDir dir;
  struct Case {
    uint32_t bits, cluster;
    uint64_t copies;
  };
  // 16 bits with 512-byte clusters: 40000 copies are 20 MiB.
  for (const Case c : {Case{1, 4096, 300}, Case{2, 4096, 300}, Case{4, 4096, 300}, Case{8, 4096, 300},
                       Case{16, 512, 40000}}) {
    CAPTURE(c.bits);
    const std::string img = dir / ("b" + std::to_string(c.bits) + ".qcow2");
    RunResult r = Run(Tool() + " create -q -o refcount_bits=" + std::to_string(c.bits) +
                      ",cluster_size=" + std::to_string(c.cluster) + " " + Sh(img) + " " +
                      std::to_string(c.copies * c.cluster) + " && " + Tool() + " write --pattern 0x5a --length " +
                      std::to_string(c.copies * c.cluster) + " " + Sh(img) + " 0");
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    // The warning comes exactly when nothing can be shared.
    CHECK((r.err.find("warning: with refcount_bits=") != std::string::npos) == (ShareLimit(c.bits) == 1));
    CheckQemuClean(img);
    const auto refs = References(img, c.cluster);
    const uint64_t limit = ShareLimit(c.bits);
    uint64_t most = 0, total = 0;
    for (const auto& [host, n] : refs) {
      most = std::max(most, n);
      total += n;
    }
    CHECK(total == c.copies);
    CHECK(most == std::min(limit, c.copies));
    CHECK(refs.size() == (c.copies + limit - 1) / limit);
  }
}

TEST_CASE("convert warns when the refcount width leaves no sharing, and not otherwise") {
  TempDir dir;
  RunResult made = Run("head -c 1M /dev/zero | tr '\\0' 'x' >" + Sh(dir / "src.raw"));
  REQUIRE(made.exit_code == 0);
  for (uint32_t bits : {1u, 2u, 4u, 16u}) {
    CAPTURE(bits);
    RunResult r = Run(Tool() + " convert -q --force -o refcount_bits=" + std::to_string(bits) + " " +
                      Sh(dir / "src.raw") + " " + Sh(dir / "out.qcow2"));
    INFO(r.err);
    CHECK(r.exit_code == 0);
    if (ShareLimit(bits) == 1) {
      CHECK(LineCount(r.err) == 1);
      CHECK(r.err.find("warning: with refcount_bits=" + std::to_string(bits) + " no cluster is shared") !=
            std::string::npos);
    } else {
      CHECK(r.err.empty());
    }
  }
}
