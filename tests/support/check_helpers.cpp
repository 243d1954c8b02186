#include "support/check_helpers.h"

#include <doctest/doctest.h>

#include <filesystem>

#include "format/endian.h"
#include "format/entries.h"
#include "format/refcount_block.h"
#include "support/qcow2_layout.h"

namespace testing {

using namespace qcow2dedup;


CheckReport OurCheck(const std::string& path, RepairMode mode) {
  CheckOptions o;
  o.repair = mode;
  auto r = CheckImage(path, std::move(o));
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  return *r;
}

std::string Messages(const CheckReport& r) {
  std::string s;
  for (const auto& f : r.findings) s += f.text + "\n";
  return s;
}

bool HasMessage(const CheckReport& r, const std::string& part) {
  for (const auto& f : r.findings)
    if (f.text.find(part) != std::string::npos) return true;
  return false;
}

void SameCountsAsQemu(const CheckReport& ours, const QemuCheckResult& q) {
  INFO("ours:\n" << Messages(ours) << "qemu-img:\n" << q.err << q.out);
  CHECK_MESSAGE(q.json.is_object(), "qemu-img check printed no JSON");
  if (!q.json.is_object()) return;
  CHECK(ours.check_errors == q.Get("check-errors"));
  CHECK(ours.corruptions == q.Get("corruptions"));
  CHECK(ours.leaks == q.Get("leaks"));
  CHECK(ours.image_end_offset == q.Get("image-end-offset"));
  CHECK(ours.total_clusters == q.Get("total-clusters"));
  CHECK(ours.allocated_clusters == q.Get("allocated-clusters"));
  CHECK(ours.fragmented_clusters == q.Get("fragmented-clusters"));
  CHECK(ours.compressed_clusters == q.Get("compressed-clusters"));
}

void SameAsQemu(const CheckReport& ours, const QemuCheckResult& q) {
  INFO("ours:\n" << Messages(ours) << "qemu-img:\n" << q.err << q.out);
  CHECK(CheckExitCode(ours) == q.exit_code);
  SameCountsAsQemu(ours, q);
}

std::string GuestView(const std::string& image, const std::string& raw_path) {
  const RunResult r = Run("qemu-img convert -U -f qcow2 -O raw " + Sh(image) + " " + Sh(raw_path));
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  return ReadFileBytes(raw_path);
}

void CopyFile(const std::string& from, const std::string& to) {
  std::filesystem::copy_file(from, to, std::filesystem::copy_options::overwrite_existing);
}

ImageBytes::ImageBytes(const std::string& path) {
  auto f = OpenPosixFile(path, OpenMode::kReadWrite);
  REQUIRE_MESSAGE(f.ok(), f.status().message());
  file_ = std::move(f).value();
  auto size = file_->Size();
  REQUIRE(size.ok());
  std::vector<uint8_t> head(std::min<uint64_t>(*size, 2u << 20));
  REQUIRE(file_->ReadAt(0, head).ok());
  auto h = ParseHeader(head, *size);
  REQUIRE_MESSAGE(h.ok(), h.status().message());
  h_ = *h;
}

uint64_t ImageBytes::Get64(uint64_t at) {
  uint8_t b[8];
  REQUIRE(file_->ReadAt(at, b).ok());
  return LoadBe64(b);
}

void ImageBytes::Set64(uint64_t at, uint64_t v) {
  uint8_t b[8];
  StoreBe64(b, v);
  REQUIRE(file_->WriteAt(at, b).ok());
}

std::vector<uint8_t> ImageBytes::Read(uint64_t at, size_t n) {
  std::vector<uint8_t> v(n);
  REQUIRE(file_->ReadAt(at, v).ok());
  return v;
}

void ImageBytes::Write(uint64_t at, std::span<const uint8_t> data) { REQUIRE(file_->WriteAt(at, data).ok()); }

uint64_t ImageBytes::L2EntryAt(uint64_t g) {
  const uint64_t l1 = Get64(h_.l1_offset + g / h_.l2_entries() * 8);
  REQUIRE((l1 & kOffsetMask) != 0);
  return (l1 & kOffsetMask) + g % h_.l2_entries() * 8;
}

uint64_t ImageBytes::HostCluster(uint64_t g) { return (L2(g) & kOffsetMask) / cluster_size(); }

uint64_t ImageBytes::L2TableCluster(uint64_t g) { return L2EntryAt(g) / cluster_size(); }

uint64_t ImageBytes::Refcount(uint64_t c) {
  const std::vector<uint8_t> block = Read(BlockAt(c), cluster_size());
  return GetRefcount(block.data(), h_.refcount_order, c % h_.refblock_entries());
}

void ImageBytes::SetRefcount(uint64_t c, uint64_t v) {
  const uint64_t at = BlockAt(c);
  std::vector<uint8_t> block = Read(at, cluster_size());
  qcow2dedup::SetRefcount(block.data(), h_.refcount_order, c % h_.refblock_entries(), v);
  Write(at, block);
}

uint64_t ImageBytes::BlockAt(uint64_t c) {
  const uint64_t e = Get64(h_.reftable_offset + c / h_.refblock_entries() * 8);
  REQUIRE(e != 0);
  return e;
}

}  // namespace testing
