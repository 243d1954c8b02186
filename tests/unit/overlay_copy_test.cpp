// Overlays in the library: Image::Create with a backing file (CreateOptions
// backing_file/backing_format, resolved by BackingPath) and CopyInto with
// CopyOptions::base (convert -B): only what differs from the base is
// written, zeros over base data are zero clusters, the rest deduplicated.
#include <doctest/doctest.h>

#include <unistd.h>

#include <fstream>

#include "qcow2dedup/convert.h"
#include "support/image_helpers.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;
using testing::RandomBytes;
using testing::TempDir;

namespace {

constexpr uint64_t kCluster = 64 << 10;

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes, uint64_t size) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  f.close();
  REQUIRE(::truncate(path.c_str(), off_t(size)) == 0);
}

std::unique_ptr<BlockDevice> OpenRaw(const std::string& path) {
  auto dev = OpenBlockDevice(path, ImageFormat::kRaw);
  REQUIRE_MESSAGE(dev.ok(), dev.status().message());
  return std::move(dev).value();
}

}  // namespace

TEST_CASE("BackingPath resolves a relative name against the image's directory, as QEMU") {
  CHECK(BackingPath("top.qcow2", "base.img") == "base.img");
  CHECK(BackingPath("vms/top.qcow2", "../base.img") == "vms/../base.img");
  CHECK(BackingPath("/srv/vms/top.qcow2", "base.img") == "/srv/vms/base.img");
  CHECK(BackingPath("vms/top.qcow2", "/srv/base.img") == "/srv/base.img");
}

TEST_CASE("Create with a backing file: validated, stored, followed") {
  TempDir dir;
  const std::string base = dir / "base.raw";
  WriteFile(base, RandomBytes(kCluster, 1), 2 * kCluster);
  CreateOptions o;
  o.virtual_size = 4 * kCluster;
  o.backing_format = "raw";
  CHECK(Image::Create(dir / "a.qcow2", o).status().kind() == ErrorKind::kInvalidArgument);  // a format, no file
  o.backing_file = "base.raw";
  o.backing_format = "vmdk";
  CHECK(Image::Create(dir / "b.qcow2", o).status().kind() == ErrorKind::kUnsupported);
  o.backing_format = "raw";
  auto img = Image::Create(dir / "c.qcow2", o);
  REQUIRE_MESSAGE(img.ok(), img.status().message());
  const ImageInfo info = (*img)->Info();
  CHECK(info.backing_file == "base.raw");
  CHECK(info.full_backing_file == dir / "base.raw");
  CHECK(info.backing_format == "raw");
  // The base shows through, zeros past its end.
  std::vector<uint8_t> got(4 * kCluster), want = RandomBytes(kCluster, 1);
  want.resize(4 * kCluster);
  REQUIRE((*img)->Read(0, got).ok());
  CHECK(got == want);
  REQUIRE((*img)->Close().ok());
}

TEST_CASE("CopyInto with a base writes only what differs from it") {
  TempDir dir;
  const std::string base_path = dir / "base.raw", src_path = dir / "src.raw", dst_path = dir / "top.qcow2";
  // base: 16 clusters of data. src: 24 clusters, the base but for cluster
  // 2 (zeroed), 5 and 9 (the same new data) and 20 (past the base's end);
  // 16-19 and 21-23 a hole, as the base reads past its end.
  std::vector<uint8_t> base = RandomBytes(16 * kCluster, 7), src = base;
  const std::vector<uint8_t> x = RandomBytes(kCluster, 8), y = RandomBytes(kCluster, 9);
  std::fill_n(src.begin() + 2 * kCluster, kCluster, 0);
  std::copy(x.begin(), x.end(), src.begin() + 5 * kCluster);
  std::copy(x.begin(), x.end(), src.begin() + 9 * kCluster);
  WriteFile(base_path, base, base.size());
  WriteFile(src_path, src, 24 * kCluster);
  {
    std::fstream f(src_path, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(20 * kCluster);
    f.write(reinterpret_cast<const char*>(y.data()), std::streamsize(y.size()));
  }
  src.resize(24 * kCluster);
  std::copy(y.begin(), y.end(), src.begin() + 20 * kCluster);

  auto source = OpenRaw(src_path), base_dev = OpenRaw(base_path);
  CreateOptions o;
  o.virtual_size = src.size();
  o.backing_file = "base.raw";
  o.backing_format = "raw";
  auto dst = Image::Create(dst_path, o);
  REQUIRE_MESSAGE(dst.ok(), dst.status().message());
  REQUIRE(CopyInto(*source, **dst, {}, {.base = base_dev.get()}).ok());
  const WriteStats& st = (*dst)->write_stats();
  CHECK(st.clusters_written == 4);  // 2, 5, 9, 20: the other 20 are left to the base
  CHECK(st.zero_clusters == 1);
  CHECK(st.new_clusters == 2);
  CHECK(st.dedup_hits == 1);
  REQUIRE((*dst)->Close().ok());
  dst->reset();

  auto reopened = Image::Open(dst_path, {});
  REQUIRE_MESSAGE(reopened.ok(), reopened.status().message());
  std::vector<uint8_t> got(src.size());
  REQUIRE((*reopened)->Read(0, got).ok());
  CHECK(got == src);
}
