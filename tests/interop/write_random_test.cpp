// A seeded randomized run of several hundred writes into a dedup image,
// against a raw mirror of what the guest must see. Every ~50 writes the
// image is closed and judged by stock QEMU (qemu-img check, compare, info)
// and by our own reading of its tables; halfway through, qemu-io writes into
// it (clearing our "index in sync" bit) and the library must rebuild its
// index and carry on.
//
// QCOW2DEDUP_SEED=N overrides the seed (printed on failure).
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

#include "qcow2dedup/image.h"
#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using namespace testing;

namespace {

constexpr uint64_t kDedupInSyncBit = 1ull << 48;  // our autoclear bit

uint64_t SeedFor(uint64_t cluster_size) {
  if (const char* s = std::getenv("QCOW2DEDUP_SEED"); s && *s) return std::strtoull(s, nullptr, 0);
  return 0x5eed0000 + cluster_size;
}

// Distinct non-zero cluster contents of a guest view (the tail zero-padded):
// what optimal dedup stores.
uint64_t DistinctNonZeroClusters(const std::vector<uint8_t>& disk, uint64_t cs) {
  std::unordered_set<std::string> seen;
  std::string zero(cs, '\0');
  for (uint64_t off = 0; off < disk.size(); off += cs) {
    std::string c(reinterpret_cast<const char*>(&disk[off]), std::min<uint64_t>(cs, disk.size() - off));
    c.resize(cs, '\0');
    if (c != zero) seen.insert(std::move(c));
  }
  return seen.size();
}

// Distinct contents among the host data clusters the image stores.
uint64_t DistinctStoredContents(const std::string& path, const Qcow2Layout& l) {
  std::string file = ReadFileBytes(path);
  std::unordered_set<std::string> seen;
  for (const auto& [c, refs] : l.data_refs) seen.insert(file.substr(c * l.cluster_size, l.cluster_size));
  return seen.size();
}

class RandomRun {
 public:
  RandomRun(const TempDir& dir, uint64_t cs, uint64_t vsize, uint64_t seed)
      : cs_(cs), vsize_(vsize), rng_(seed), mirror_(vsize, 0), img_path_(dir / "img.qcow2"),
        raw_path_(dir / "mirror.raw") {
    CreateOptions o;
    o.virtual_size = vsize;
    o.cluster_size = uint32_t(cs);
    auto img = Image::Create(img_path_, o);
    REQUIRE_MESSAGE(img.ok(), img.status().message());
    img_ = std::move(img).value();
    REQUIRE(img_->virtual_size() == vsize);
  }

  uint64_t U(uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_); }
  bool Chance(double p) { return std::bernoulli_distribution(p)(rng_); }
  uint64_t guest_clusters() const { return (vsize_ + cs_ - 1) / cs_; }

  void Write(uint64_t off, const std::vector<uint8_t>& data, const std::string& kind) {
    REQUIRE(off + data.size() <= vsize_);
    Status s = img_->Write(off, data);
    INFO("write #" << writes_ << " (" << kind << ") of " << data.size() << " bytes at " << off);
    REQUIRE_MESSAGE(s.ok(), s.message());
    std::memcpy(&mirror_[off], data.data(), data.size());
    ++writes_;
  }

  std::vector<uint8_t> RandomBytes(uint64_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = uint8_t(rng_());
    return v;
  }

  // A random length: a few bytes, up to a cluster, whole clusters, or more.
  uint64_t RandomLength() {
    switch (U(0, 4)) {
      case 0: return U(1, 16);
      case 1: return U(1, cs_);
      case 2: return cs_ * U(1, 4);
      case 3: return U(cs_, 4 * cs_ + cs_ / 2);
      default: return U(1, 3) * 512;
    }
  }
  uint64_t RandomOffset(uint64_t len) {
    uint64_t max = vsize_ - len;
    uint64_t off = U(0, max);
    if (Chance(0.4)) off = off / cs_ * cs_;
    else if (Chance(0.3)) off = off / 512 * 512;
    return off;
  }

  void OneRandomWrite() {
    const uint64_t op = U(0, 99);
    if (op < 20) {  // random data
      uint64_t len = RandomLength();
      Write(RandomOffset(len), RandomBytes(len), "random");
    } else if (op < 30) {  // a byte pattern: identical clusters across writes
      uint64_t len = Chance(0.5) ? cs_ * U(1, 3) : RandomLength();
      uint64_t off = Chance(0.7) ? U(0, (vsize_ - len) / cs_) * cs_ : RandomOffset(len);
      Write(off, std::vector<uint8_t>(len, uint8_t(0x11 * U(1, 3))), "pattern");
    } else if (op < 40) {  // zeros (whole clusters free, partial ones rewrite)
      uint64_t len = RandomLength();
      Write(RandomOffset(len), std::vector<uint8_t>(len, 0), "zeros");
    } else if (op < 62) {  // copy whole clusters the image holds: dedup
      uint64_t n = U(1, 4);
      uint64_t src = U(0, guest_clusters() - n - 1) * cs_;
      uint64_t dst = U(0, guest_clusters() - n - 1) * cs_;
      std::vector<uint8_t> d(mirror_.begin() + src, mirror_.begin() + src + n * cs_);
      Write(dst, d, "aligned copy");
      for (uint64_t i = 0; i < n; ++i) {
        shared_.push_back(src + i * cs_);
        shared_.push_back(dst + i * cs_);
      }
    } else if (op < 70) {  // an unaligned copy that keeps the offset within the cluster
      uint64_t len = U(1, 3 * cs_);
      uint64_t src = U(0, vsize_ - len - cs_);
      uint64_t dst = U(0, (vsize_ - len - cs_) / cs_) * cs_ + src % cs_;
      std::vector<uint8_t> d(mirror_.begin() + src, mirror_.begin() + src + len);
      Write(dst, d, "unaligned copy");
    } else if (op < 82 && !shared_.empty()) {  // overwrite (part of) a shared cluster
      uint64_t c = shared_[U(0, shared_.size() - 1)];
      if (c + cs_ > vsize_) return OneRandomWrite();
      if (Chance(0.5)) {
        Write(c, RandomBytes(cs_), "overwrite shared (whole)");
      } else {
        uint64_t in = U(0, cs_ - 1), len = U(1, cs_ - in);
        Write(c + in, RandomBytes(len), "overwrite shared (partial)");
      }
    } else if (op < 90) {  // the last, partial cluster of the disk
      uint64_t tail = vsize_ % cs_ ? vsize_ % cs_ : cs_;
      uint64_t off = vsize_ - U(1, tail + cs_);
      uint64_t len = U(1, vsize_ - off);
      std::vector<uint8_t> d = Chance(0.3) ? std::vector<uint8_t>(len, 0) : RandomBytes(len);
      Write(off, d, "tail");
    } else if (op < 95) {  // the same bytes again where they already are
      uint64_t len = RandomLength();
      uint64_t off = RandomOffset(len);
      std::vector<uint8_t> d(mirror_.begin() + off, mirror_.begin() + off + len);
      Write(off, d, "rewrite unchanged");
    } else {  // one cluster copied many times: high refcounts
      uint64_t src = U(0, guest_clusters() - 2) * cs_;
      std::vector<uint8_t> d(mirror_.begin() + src, mirror_.begin() + src + cs_);
      for (int i = 0; i < 6; ++i) {
        uint64_t dst = U(0, guest_clusters() - 2) * cs_;
        Write(dst, d, "fan-out copy");
        shared_.push_back(dst);
      }
    }
    if (shared_.size() > 64) shared_.erase(shared_.begin(), shared_.begin() + 32);
  }

  // Closes the image and lets QEMU judge it; reopens it for writing.
  // only_ours: no one but the library has written the image so far.
  void CloseAndJudge(bool only_ours, bool reopen) {
    const WriteStats st = img_->write_stats();
    dedup_hits_ += st.dedup_hits;
    new_clusters_ += st.new_clusters;
    freed_ += st.freed_clusters;
    {
      Status s = img_->Close();
      REQUIRE_MESSAGE(s.ok(), s.message());
    }
    img_.reset();
    ++judgements_;
    WriteFileBytes(raw_path_, std::string(mirror_.begin(), mirror_.end()));
    INFO("after write #" << writes_ << ", judgement " << judgements_);
    CheckQemuClean(img_path_);
    CheckQemuIdentical(img_path_, raw_path_);
    nlohmann::json info = QemuImgInfo(img_path_);
    REQUIRE(info.is_object());
    CHECK(info["virtual-size"] == vsize_);
    CHECK(info["cluster-size"] == cs_);
    CHECK(info["format-specific"]["data"]["refcount-bits"] == 16);

    std::string err;
    auto layout = ReadQcow2Layout(img_path_, &err);
    REQUIRE_MESSAGE(layout.has_value(), err);
    const Qcow2Layout& l = *layout;
    INFO("layout problems: " << (l.problems.empty() ? "" : l.problems.front()));
    CHECK(l.refcount_mismatches == 0);
    CHECK(l.copied_mismatches == 0);
    CHECK((l.incompatible & 1) == 0);  // not dirty
    CHECK((l.autoclear & kDedupInSyncBit) != 0);
    CHECK(l.has_dedup_extension);
    const uint64_t distinct_stored = DistinctStoredContents(img_path_, l);
    if (only_ours) {
      // Identical clusters are stored once: exactly the distinct contents.
      CHECK(l.stored_data_clusters() == DistinctNonZeroClusters(mirror_, cs_));
      CHECK(l.dedup_index_entries == l.stored_data_clusters());
      CHECK(l.zero_alloc_refs.empty());
    } else {
      // QEMU's own writes may have stored copies that nobody deduplicated
      // (and perhaps a cluster of zeros written as data).
      CHECK(distinct_stored >= DistinctNonZeroClusters(mirror_, cs_));
      CHECK(distinct_stored <= DistinctNonZeroClusters(mirror_, cs_) + 1);
      CHECK(l.dedup_index_entries <= distinct_stored);
    }
    max_sharing_ = std::max(max_sharing_, l.max_sharing());

    // The library reads back what the mirror holds.
    {
      auto ro = Image::Open(img_path_, {});
      REQUIRE_MESSAGE(ro.ok(), ro.status().message());
      std::vector<uint8_t> back(vsize_);
      Status s = (*ro)->Read(0, back);
      REQUIRE_MESSAGE(s.ok(), s.message());
      CHECK(back == mirror_);
      auto ii = (*ro)->Info();
      CHECK(ii.dedup.in_sync);
      CHECK(ii.dedup.stored_clusters.value_or(~0ull) == l.dedup_index_entries);
    }
    if (reopen) Reopen();
  }

  void Reopen() {
    OpenOptions o;
    o.writable = true;
    auto img = Image::Open(img_path_, std::move(o));
    REQUIRE_MESSAGE(img.ok(), img.status().message());
    img_ = std::move(img).value();
  }

  // The image is closed; qemu-io writes a pattern over shared clusters and
  // zeroes others (QEMU keeps the allocation of zeroed clusters: "zero,
  // allocated" entries that may point at shared clusters).
  void QemuWrites() {
    REQUIRE(!img_);
    std::string err;
    auto before = ReadQcow2Layout(img_path_, &err);
    REQUIRE_MESSAGE(before.has_value(), err);
    // Guest clusters whose host cluster is shared, to aim QEMU at them.
    std::vector<uint64_t> shared;
    for (uint64_t g = 0; g + 4 < before->guest_clusters(); ++g) {
      uint64_t h = before->HostOffset(g);
      if (h && before->data_refs.at(h / cs_) > 1) shared.push_back(g);
    }
    REQUIRE_MESSAGE(shared.size() >= 2, "the run has shared too few clusters to aim QEMU at");
    // Aim the pattern first at a cluster shared exactly twice, if any.
    std::stable_partition(shared.begin(), shared.end(),
                          [&](uint64_t g) { return before->data_refs.at(before->HostOffset(g) / cs_) == 2; });
    std::sort(shared.begin() + 1, shared.end());
    // Two regions apart: a pattern from inside one shared cluster over the
    // next one whole, and zeros over two clusters and part of a third.
    const uint64_t off = shared[0] * cs_ + 512, len = 2 * cs_ + 1024;
    std::optional<uint64_t> g2;
    for (uint64_t g : shared)
      if (g > shared[0] + 3 || g + 3 < shared[0]) {
        g2 = g;
        break;
      }
    REQUIRE_MESSAGE(g2.has_value(), "no second shared region to aim QEMU at");
    const uint64_t off2 = *g2 * cs_, len2 = 2 * cs_ + 1536;
    RunResult r = Run("qemu-io -f qcow2 -c " + Sh("write -P 0x5a " + std::to_string(off) + " " + std::to_string(len)) +
                      " -c " + Sh("write -z " + std::to_string(off2) + " " + std::to_string(len2)) + " " +
                      Sh(img_path_));
    INFO("qemu-io: " << r.out << r.err);
    REQUIRE(r.exit_code == 0);
    REQUIRE(r.out.find("wrote " + std::to_string(len) + "/") != std::string::npos);
    REQUIRE(r.out.find("wrote " + std::to_string(len2) + "/") != std::string::npos);
    std::memset(&mirror_[off], 0x5a, len);
    std::memset(&mirror_[off2], 0, len2);
    qemu_cluster_ = off / cs_ + 1;  // wholly 0x5a now
    ++writes_;

    auto after = ReadQcow2Layout(img_path_, &err);
    REQUIRE_MESSAGE(after.has_value(), err);
    CHECK((after->autoclear & kDedupInSyncBit) == 0);  // QEMU cleared our bit
    MESSAGE("after qemu-io: " << after->zero_alloc_refs.size() << " zero-allocated host clusters, "
                              << after->stored_data_clusters() << " stored data clusters");
    WriteFileBytes(raw_path_, std::string(mirror_.begin(), mirror_.end()));
    CheckQemuIdentical(img_path_, raw_path_);
    {
      // QEMU's copy-on-write away from a cluster shared by exactly two guest
      // clusters drops its refcount to 1 without setting COPIED on the other
      // L2 entry (QEMU only meets shared clusters through snapshots, whose
      // tables carry no COPIED flags). qemu-img check calls that a
      // corruption ("ERROR OFLAG_COPIED data cluster ... refcount=1"). That
      // much is QEMU's doing and tolerated here, and nothing else; the
      // library must leave the image clean after its next session.
      QemuCheckResult c = QemuImgCheck(img_path_);
      INFO("qemu-img check right after qemu-io:\n" << c.out << c.err);
      REQUIRE(c.json.is_object());
      CHECK(c.Get("check-errors") == 0);
      CHECK(c.Get("leaks") == 0);
      std::istringstream lines(c.err);
      uint64_t copied_errors = 0;
      for (std::string line; std::getline(lines, line);) {
        if (line.empty()) continue;
        const bool qemus = line.rfind("ERROR OFLAG_COPIED data cluster: ", 0) == 0 &&
                           line.find(" refcount=1") != std::string::npos;
        CHECK_MESSAGE(qemus, "unexpected finding: " << line);
        copied_errors += qemus;
      }
      CHECK(c.Get("corruptions") == copied_errors);
      CHECK((c.exit_code == 0 || (c.exit_code == 2 && copied_errors > 0)));
      if (copied_errors)
        MESSAGE("qemu-io left " << copied_errors << " L2 entries without COPIED at refcount 1 (QEMU behaviour)");
    }
    {
      auto ro = Image::Open(img_path_, {});
      REQUIRE_MESSAGE(ro.ok(), ro.status().message());
      CHECK_FALSE((*ro)->Info().dedup.in_sync);
    }

    // Our library again: the index is rebuilt from the data, so what QEMU
    // stored is found like anything else.
    Reopen();
    std::vector<uint8_t> d(mirror_.begin() + qemu_cluster_ * cs_, mirror_.begin() + (qemu_cluster_ + 1) * cs_);
    REQUIRE(d == std::vector<uint8_t>(cs_, 0x5a));
    const WriteStats before_stats = img_->write_stats();
    uint64_t dst = U(0, guest_clusters() - 2) * cs_;
    while (dst / cs_ == qemu_cluster_) dst = U(0, guest_clusters() - 2) * cs_;
    Write(dst, d, "copy of QEMU's cluster");
    CHECK(img_->write_stats().dedup_hits == before_stats.dedup_hits + 1);
    CHECK(img_->write_stats().new_clusters == before_stats.new_clusters);
  }

  // total_ops random operations (some write more than once), judged every
  // close_every of them; qemu-io writes after the judgement at qemu_at.
  void Execute(int total_ops, int close_every, int qemu_at) {
    bool only_ours = true;
    int ops = 0;
    while (ops < total_ops) {
      for (int i = 0; i < close_every && ops < total_ops; ++i, ++ops) OneRandomWrite();
      const bool qemu_now = only_ours && ops >= qemu_at;
      CloseAndJudge(only_ours, /*reopen=*/!qemu_now && ops < total_ops);
      if (qemu_now) {
        QemuWrites();
        only_ours = false;
      }
    }
    if (img_) CloseAndJudge(only_ours, false);
    CHECK_FALSE(only_ours);
  }

  uint64_t cs_, vsize_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> mirror_;
  std::string img_path_, raw_path_;
  std::unique_ptr<Image> img_;
  std::vector<uint64_t> shared_;
  int writes_ = 0, judgements_ = 0;
  uint64_t qemu_cluster_ = 0;
  uint64_t dedup_hits_ = 0, new_clusters_ = 0, freed_ = 0, max_sharing_ = 0;
};

void RandomWrites(uint64_t cs) {
  REQUIRE(HaveCommand("qemu-img"));
  REQUIRE(HaveCommand("qemu-io"));
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t seed = SeedFor(cs);
  INFO("cluster size " << cs << ", seed " << seed << " (QCOW2DEDUP_SEED overrides)");
  TempDir dir;
  // A partial last cluster at both cluster sizes.
  const uint64_t vsize = (32ull << 20) + 2560;
  RandomRun run(dir, cs, vsize, seed);
  // QCOW2DEDUP_CLOSE_EVERY=1 judges after every write (to find a failing one).
  int close_every = 50;
  if (const char* s = std::getenv("QCOW2DEDUP_CLOSE_EVERY"); s && *s) close_every = std::max(1, std::atoi(s));
  // QCOW2DEDUP_OPS=N runs longer (qemu-io still writes halfway).
  int ops = 400;
  if (const char* s = std::getenv("QCOW2DEDUP_OPS"); s && *s) ops = std::max(100, std::atoi(s));
  run.Execute(ops, close_every, /*qemu_at=*/ops / 2);
  CHECK(run.judgements_ >= ops / close_every);
  CHECK(run.dedup_hits_ > 0);
  CHECK(run.freed_ > 0);
  CHECK(run.max_sharing_ > 2);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("cluster size " << cs << ": " << run.writes_ << " writes, " << run.judgements_ << " judgements, "
                          << run.dedup_hits_ << " dedup hits, " << run.new_clusters_ << " new clusters, "
                          << run.freed_ << " freed, max sharing " << run.max_sharing_ << ", " << secs << " s");
}

}  // namespace

TEST_CASE("random writes against a raw mirror, 4K clusters") { RandomWrites(4096); }

TEST_CASE("random writes against a raw mirror, 64K clusters") { RandomWrites(65536); }
