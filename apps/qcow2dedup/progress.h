// The -p progress line: percent, rate, dedup so far, time left. On stderr,
// but convert's on stdout, where qemu-img convert -p prints its own.
// Redrawn in place with \r at most ten times a second.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "qcow2dedup/image.h"

namespace qcow2dedup::cli {

class Progress {
 public:
  // What the library counts in: convert, export and simulate report bytes;
  // check and the index rebuild report clusters.
  enum class Unit { kBytes, kClusters };

  // extra: a few words appended to the line, e.g. "dedup 1.52x" (may be empty).
  explicit Progress(bool enabled, Unit unit = Unit::kBytes, std::function<std::string()> extra = {},
                    std::FILE* out = stderr);
  ~Progress();

  // total 0: the length is unknown (standard input); done is shown in bytes.
  void Update(uint64_t done, uint64_t total);
  // Draws the last state and ends the line; later updates are ignored.
  void Finish();
  // A new phase (index rebuild, then writing) starts: a new line, a new rate.
  void Restart(Unit unit);

  ProgressFn fn() {
    if (!enabled_) return {};
    return [this](uint64_t done, uint64_t total) { Update(done, total); };
  }

 private:
  using Clock = std::chrono::steady_clock;
  void Draw();
  void EndLine();

  bool enabled_;
  Unit unit_;
  std::function<std::string()> extra_;
  std::FILE* out_;
  Clock::time_point start_, last_draw_;
  bool drawn_ = false, finished_ = false;
  uint64_t done_ = 0, total_ = 0;
  size_t last_width_ = 0;
};

// "dedup 1.52x" for the write session of img (empty while img is null).
std::function<std::string()> DedupSoFar(const std::unique_ptr<Image>& img);

}  // namespace qcow2dedup::cli
