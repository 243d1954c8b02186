// SimulateFleet against a plain model: every image's clusters compared
// byte for byte, in std::sets, at several cluster sizes, on images of
// different sizes (none a whole number of the largest cluster) derived from
// one base.
#include <doctest/doctest.h>

#include <fstream>
#include <random>
#include <set>
#include <string>

#include "qcow2dedup/stats.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::TempDir;

namespace {

const std::vector<uint64_t> kSizes = {65536, 512, 4096};

struct Model {
  uint64_t nonzero = 0, unique = 0;
  uint64_t differing = 0, overlay_unique = 0;
};

std::string ClusterOf(const std::string& disk, uint64_t i, uint64_t cs) {
  std::string c = i * cs < disk.size() ? disk.substr(i * cs, cs) : std::string();
  c.resize(cs, '\0');  // a partial last cluster, or past the end: zeros
  return c;
}

// The model: what each image alone, and its overlay on base, stores at cs;
// all: the distinct non-zero clusters over every image.
std::vector<Model> Expect(const std::vector<std::string>& disks, const std::string& base, uint64_t cs,
                          std::set<std::string>& all) {
  const std::string zero(cs, '\0');
  std::vector<Model> out;
  for (const std::string& d : disks) {
    Model m;
    std::set<std::string> alone, overlay;
    for (uint64_t i = 0; i * cs < d.size(); ++i) {
      std::string c = ClusterOf(d, i, cs);
      if (c == zero) continue;
      ++m.nonzero;
      alone.insert(c);
      all.insert(c);
      // The base is compared on the image's bytes only: past the image's
      // end both are padding.
      std::string b = ClusterOf(base, i, cs);
      if (d.size() < (i + 1) * cs) std::fill(b.begin() + (d.size() - i * cs), b.end(), '\0');
      if (c != b) {
        ++m.differing;
        overlay.insert(c);
      }
    }
    m.unique = alone.size();
    m.overlay_unique = overlay.size();
    out.push_back(m);
  }
  return out;
}

std::string Derive(const std::string& base, size_t size, std::mt19937& rng) {
  std::string d = base.substr(0, std::min(size, base.size()));
  d.resize(size, '\0');
  for (int k = 0; k < 6; ++k) {
    const size_t at = rng() % (size / 4096) * 4096, len = std::min<size_t>(size - at, 512 << (rng() % 5));
    switch (rng() % 4) {
      case 0: std::fill_n(d.begin() + at, len, '\0'); break;
      case 1: std::fill_n(d.begin() + at, len, char(rng() % 3 + 1)); break;  // few distinct fills
      case 2: d[at + rng() % len] ^= 1; break;
      case 3: {  // a copy of some other aligned stretch of the base
        const size_t from = rng() % (base.size() / 4096) * 4096;
        for (size_t i = 0; i < len && from + i < base.size(); ++i) d[at + i] = base[from + i];
      }
    }
  }
  return d;
}

void Spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << bytes;
  REQUIRE(f.good());
}

std::unique_ptr<BlockDevice> Open(const std::string& path) {
  auto dev = OpenBlockDevice(path, ImageFormat::kRaw);
  REQUIRE_MESSAGE(dev.ok(), dev.status().message());
  return std::move(dev).value();
}

}  // namespace

TEST_CASE("a fleet's simulation is what comparing every cluster gives") {
  std::mt19937 rng(15);
  std::string base((1 << 20) + 1000, '\0');
  for (size_t i = 0; i < base.size(); i += 512)  // a few kinds of sector, zeros among them
    std::fill_n(base.begin() + i, std::min<size_t>(512, base.size() - i), char(rng() % 6 * 40));
  for (size_t i = 300 << 10; i < (340 << 10); ++i) base[i] = char(rng());
  const std::vector<std::string> disks = {Derive(base, base.size(), rng), Derive(base, (700 << 10) + 3, rng),
                                          Derive(base, (3 << 19) + 512, rng), base};
  TempDir dir;
  Spit(dir / "base.raw", base);
  std::vector<std::unique_ptr<BlockDevice>> devs;
  std::vector<FleetImage> images;
  for (size_t i = 0; i < disks.size(); ++i) {
    Spit(dir / ("vm" + std::to_string(i) + ".raw"), disks[i]);
    devs.push_back(Open(dir / ("vm" + std::to_string(i) + ".raw")));
    images.push_back({"vm" + std::to_string(i), devs.back().get()});
  }
  auto base_dev = Open(dir / "base.raw");

  uint64_t last_done = 0, last_total = 0;
  bool backwards = false;
  auto r = SimulateFleet(images, FleetImage{"base", base_dev.get()}, kSizes, [&](uint64_t done, uint64_t total) {
    backwards |= done < last_done;
    last_done = done, last_total = total;
  });
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  REQUIRE(r->size() == kSizes.size());
  uint64_t sum = base.size();
  for (const std::string& d : disks) sum += d.size();
  CHECK_FALSE(backwards);
  CHECK(last_done == sum);
  CHECK(last_total == sum);

  for (size_t k = 0; k < kSizes.size(); ++k) {
    const FleetSimulation& f = (*r)[k];
    const uint64_t cs = kSizes[k];
    CAPTURE(cs);
    CHECK(f.cluster_size == cs);
    std::set<std::string> all, base_set;
    const auto want = Expect(disks, base, cs, all);
    const auto want_base = Expect({base}, base, cs, base_set);
    REQUIRE(f.alone.size() == disks.size());
    REQUIRE(f.overlays.size() == disks.size());
    uint64_t nonzero = 0;
    for (size_t i = 0; i < disks.size(); ++i) {
      CAPTURE(i);
      CHECK(f.alone[i].clusters == (disks[i].size() + cs - 1) / cs);
      CHECK(f.alone[i].nonzero == want[i].nonzero);
      CHECK(f.alone[i].unique == want[i].unique);
      CHECK(f.overlays[i].differing == want[i].differing);
      CHECK(f.overlays[i].unique == want[i].overlay_unique);
      nonzero += want[i].nonzero;
      // What makes the case worth having: overlays store less than alone,
      // something, and dedup within them.
      if (i < 3) {
        CHECK(want[i].overlay_unique > 0);
        CHECK(want[i].overlay_unique < want[i].unique);
      }
    }
    CHECK(want[3].differing == 0);  // the base itself
    CHECK(f.alone_unique == want[0].unique + want[1].unique + want[2].unique + want[3].unique);
    CHECK(f.overlays_unique ==
          want[0].overlay_unique + want[1].overlay_unique + want[2].overlay_unique + want[3].overlay_unique);
    CHECK(f.together_ratio == doctest::Approx(double(nonzero) / double(all.size())));
    CHECK(f.together_nonzero == nonzero);
    CHECK(f.together_unique == all.size());
    CHECK(all.size() < want[0].unique + want[1].unique + want[2].unique + want[3].unique);
    REQUIRE(f.base.has_value());
    CHECK(f.base->nonzero == want_base[0].nonzero);
    CHECK(f.base->unique == want_base[0].unique);
    // Alone, an image's figures are SimulateDedup's own.
    auto single = SimulateDedup(*images[1].device, {cs});
    REQUIRE(single.ok());
    CHECK((*single)[0].unique == f.alone[1].unique);
    CHECK((*single)[0].estimated_image_size == f.alone[1].estimated_image_size);
  }
  CHECK(std::set<uint64_t>{(*r)[0].overlays[0].unique, (*r)[1].overlays[0].unique,
                           (*r)[2].overlays[0].unique}.size() > 1);  // the sizes see different things
}

TEST_CASE("a fleet without a base, and without images") {
  TempDir dir;
  Spit(dir / "a.raw", std::string(8192, 'a') + std::string(4096, 'b'));
  Spit(dir / "b.raw", std::string(4096, 'b') + std::string(4096, '\0') + std::string(4096, 'c'));
  auto a = Open(dir / "a.raw"), b = Open(dir / "b.raw");
  auto r = SimulateFleet({{"a", a.get()}, {"b", b.get()}}, std::nullopt, {4096});
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  const FleetSimulation& f = (*r)[0];
  CHECK(f.alone[0].nonzero == 3);
  CHECK(f.alone[0].unique == 2);
  CHECK(f.alone[1].nonzero == 2);
  CHECK(f.alone[1].unique == 2);
  CHECK(f.together_nonzero == 5);
  CHECK(f.together_unique == 3);  // a, b, c
  CHECK_FALSE(f.base.has_value());
  CHECK(f.overlays.empty());

  CHECK(SimulateFleet({}, std::nullopt, {4096}).status().kind() == ErrorKind::kInvalidArgument);
  CHECK(SimulateFleet({{"a", a.get()}}, std::nullopt, {3000}).status().kind() == ErrorKind::kInvalidArgument);
}

namespace {

// A device of bytes 1 whose reads fail once fail_after bytes were read.
class FailingDevice : public BlockDevice {
 public:
  FailingDevice(uint64_t size, uint64_t fail_after) : size_(size), fail_after_(fail_after) {}
  uint64_t virtual_size() const override { return size_; }
  Status Read(uint64_t, std::span<uint8_t> buf) override {
    if (read_ + buf.size() > fail_after_) return Status::IOError("read failed");
    read_ += buf.size();
    std::fill(buf.begin(), buf.end(), uint8_t(1));
    return Status::Ok();
  }
  std::string format() const override { return "test"; }
  uint64_t read() const { return read_; }

 private:
  uint64_t size_, fail_after_, read_ = 0;
};

}  // namespace

TEST_CASE("a fleet's read error names the image, or the base, it came from") {
  FailingDevice good(16 << 20, UINT64_MAX), bad(16 << 20, 9 << 20);
  auto r = SimulateFleet({{"good", &good}, {"bad", &bad}}, std::nullopt, {4096});
  CHECK(r.status().kind() == ErrorKind::kIOError);
  CHECK(r.status().message() == "bad: read failed");
  // The base read whole for itself, then failing beside an image.
  FailingDevice base(16 << 20, 20 << 20), image(16 << 20, UINT64_MAX);
  r = SimulateFleet({{"image", &image}}, FleetImage{"base", &base}, {4096});
  CHECK(r.status().message() == "base: read failed");
  CHECK(base.read() >= (16 << 20));
  // Failing in its own pass.
  FailingDevice early(16 << 20, 1 << 20);
  r = SimulateFleet({{"image", &image}}, FleetImage{"base", &early}, {4096});
  CHECK(r.status().message() == "base: read failed");
}
