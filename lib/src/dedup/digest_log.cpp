#include "dedup/digest_log.h"

#include <cstdlib>
#include <cstring>

namespace qcow2dedup {

namespace {
constexpr Digest kUnknown{};
}

void DigestLog::Fail() {
  file_.reset();
  window_.clear();
  failed_ = true;
}

void DigestLog::Open() {
  if (file_ || in_memory_ || failed_) return;
  const char* tmp = std::getenv("TMPDIR");
  for (const std::string& dir : {dir_, std::string(tmp && *tmp ? tmp : "/tmp")}) {
    auto f = OpenScratchFile(dir);
    if (f.ok()) {
      file_ = std::move(f).value();
      window_.assign(kWindow, kUnknown);
      base_ = 0;
      return;
    }
  }
  in_memory_ = true;  // slower to grow, never wrong
}

Status DigestLog::FlushWindow() {
  if (dirty_lo_ >= dirty_hi_) return Status::Ok();
  const auto* p = reinterpret_cast<const uint8_t*>(&window_[dirty_lo_]);
  QD_RETURN_IF_ERROR(file_->WriteAt((base_ + dirty_lo_) * sizeof(Digest), {p, (dirty_hi_ - dirty_lo_) * sizeof(Digest)}));
  file_slots_ = std::max(file_slots_, base_ + dirty_hi_);
  dirty_lo_ = dirty_hi_ = 0;
  return Status::Ok();
}

Status DigestLog::MoveWindow(uint64_t cluster) {
  QD_RETURN_IF_ERROR(FlushWindow());
  base_ = cluster / kWindow * kWindow;
  std::fill(window_.begin(), window_.end(), kUnknown);
  if (base_ < file_slots_) {
    const uint64_t n = std::min(kWindow, file_slots_ - base_);
    QD_RETURN_IF_ERROR(file_->ReadAt(base_ * sizeof(Digest), {reinterpret_cast<uint8_t*>(window_.data()), n * sizeof(Digest)}));
  }
  return Status::Ok();
}

void DigestLog::Put(uint64_t cluster, const Digest& d) {
  Open();
  if (failed_) return;
  if (in_memory_) {
    if (d == kUnknown) memory_.erase(cluster);
    else memory_[cluster] = d;
    return;
  }
  if (cluster < base_ || cluster >= base_ + kWindow) {
    // Behind the window (a freed cluster used again, or forgotten): in
    // place. Ahead of it: the window moves on.
    if (cluster < base_ || cluster < file_slots_) {
      if (!file_->WriteAt(cluster * sizeof(Digest), d).ok()) return Fail();
      file_slots_ = std::max(file_slots_, cluster + 1);
      return;
    }
    if (!MoveWindow(cluster).ok()) return Fail();
  }
  const uint64_t i = cluster - base_;
  window_[i] = d;
  if (dirty_lo_ >= dirty_hi_) dirty_lo_ = i, dirty_hi_ = i + 1;
  else dirty_lo_ = std::min(dirty_lo_, i), dirty_hi_ = std::max(dirty_hi_, i + 1);
}

std::optional<Digest> DigestLog::Get(uint64_t cluster) {
  std::optional<Digest> none;
  if (in_memory_) {
    auto it = memory_.find(cluster);
    return it == memory_.end() ? none : std::optional<Digest>(it->second);
  }
  if (!file_) return none;
  Digest d;
  if (cluster >= base_ && cluster < base_ + kWindow) {
    d = window_[cluster - base_];
  } else {
    if (cluster >= file_slots_) return none;
    if (!file_->ReadAt(cluster * sizeof(Digest), d).ok()) {
      Fail();
      return none;
    }
  }
  return d == kUnknown ? none : std::optional<Digest>(d);
}

void DigestLog::Forget(uint64_t cluster) {
  if (!file_ && !in_memory_) return;
  if (!in_memory_ && cluster >= file_slots_ && (cluster < base_ || cluster >= base_ + kWindow)) return;
  Put(cluster, kUnknown);
}

void DigestLog::Clear() {
  file_.reset();
  in_memory_ = failed_ = false;
  memory_.clear();
  file_slots_ = base_ = 0;
  window_.clear();
  dirty_lo_ = dirty_hi_ = 0;
}

}  // namespace qcow2dedup
