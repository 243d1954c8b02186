// The guest view's read side: Image::Prefetch asks the file for exactly the
// host clusters behind a guest range (one request for each run of host
// clusters that follow one another, none for holes or zeros), and reads
// after it return what was written.
#include <doctest/doctest.h>

#include <map>
#include <set>

#include "support/forwarding_file.h"
#include "support/image_helpers.h"
#include "support/qcow2_layout.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;

namespace {

constexpr uint32_t kCluster = 4096;
constexpr uint64_t kClusters = 64;

// A file that notes the Prefetch calls made of it.
class PrefetchLog final : public testing::ForwardingFile {
 public:
  using ForwardingFile::ForwardingFile;
  void Prefetch(uint64_t offset, uint64_t len) override { asked.emplace_back(offset, len); }
  std::vector<std::pair<uint64_t, uint64_t>> asked;
};

// Guest clusters: unique data in runs, copies of earlier clusters (stored
// once, so the host runs break there), zeros and holes.
std::vector<uint8_t> WriteGuest(const std::string& path) {
  CreateOptions c;
  c.virtual_size = kClusters * kCluster;
  c.cluster_size = kCluster;
  OpenOptions o;
  o.writable = true;
  auto img = Image::Create(path, c, std::move(o));
  REQUIRE(img.ok());
  std::vector<uint8_t> guest(c.virtual_size, 0);
  for (uint64_t g = 0; g < kClusters; ++g) {
    if (g % 16 >= 12) continue;  // a hole
    std::vector<uint8_t> d = testing::RandomBytes(kCluster, g);
    if (g % 7 == 3) d.assign(kCluster, 0);                                                           // zeros
    if (g % 5 == 4) std::copy_n(guest.begin() + long((g / 2) * kCluster), kCluster, d.begin());  // a copy
    std::copy(d.begin(), d.end(), guest.begin() + long(g * kCluster));
    REQUIRE((*img)->Write(g * kCluster, d).ok());
  }
  REQUIRE((*img)->Close().ok());
  return guest;
}

}  // namespace

TEST_CASE("Prefetch asks for the host runs behind the range, and nothing else") {
  testing::TempDir dir;
  const std::string path = dir / "img.qcow2";
  const std::vector<uint8_t> guest = WriteGuest(path);
  std::string error;
  auto layout = testing::ReadQcow2Layout(path, &error);
  REQUIRE_MESSAGE(layout, error);

  auto file = OpenPosixFile(path, OpenMode::kReadOnly);
  REQUIRE(file.ok());
  auto log = std::make_unique<PrefetchLog>(std::move(file).value());
  PrefetchLog* asked = log.get();
  OpenOptions o;
  o.file = std::move(log);
  auto img = Image::Open(path, std::move(o));
  REQUIRE_MESSAGE(img.ok(), img.status().message());

  for (const auto& range : {std::pair<uint64_t, uint64_t>{0, kClusters}, {5, 20}, {12, 4}, {33, 1}}) {
    const uint64_t first = range.first, count = range.second;  // named, not bound: CAPTURE takes them into a lambda
    CAPTURE(first);
    CAPTURE(count);
    asked->asked.clear();
    (*img)->Prefetch(first * kCluster, count * kCluster);
    // What the layout says lies behind the range: host runs, in guest order.
    std::vector<std::pair<uint64_t, uint64_t>> want;
    for (uint64_t g = first; g < first + count; ++g) {
      const uint64_t h = layout->HostOffset(g);
      if (!h) continue;
      if (!want.empty() && want.back().first + want.back().second == h) want.back().second += kCluster;
      else want.emplace_back(h, kCluster);
    }
    CHECK(asked->asked == want);
  }
  // A range past the end asks for nothing and does no harm.
  asked->asked.clear();
  (*img)->Prefetch(kClusters * kCluster, kCluster);
  CHECK(asked->asked.empty());

  std::vector<uint8_t> back(guest.size());
  REQUIRE((*img)->Read(0, back).ok());
  CHECK(back == guest);
}
