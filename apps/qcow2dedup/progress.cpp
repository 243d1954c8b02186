#include "progress.h"

#include <fmt/format.h>

#include <cstdio>

#include "output.h"

namespace qcow2dedup::cli {

Progress::Progress(bool enabled, Unit unit, std::function<std::string()> extra, std::FILE* out)
    : enabled_(enabled), unit_(unit), extra_(std::move(extra)), out_(out), start_(Clock::now()) {}

namespace {
bool& LineOpen(std::FILE* out) { return out == stdout ? g_stdout_line_open : g_stderr_line_open; }
}  // namespace

Progress::~Progress() { EndLine(); }

void Progress::EndLine() {
  if (!LineOpen(out_)) return;
  std::fputc('\n', out_);
  std::fflush(out_);
  LineOpen(out_) = false;
}

void Progress::Restart(Unit unit) {
  if (LineOpen(out_)) Draw();  // the last phase's final state
  EndLine();
  unit_ = unit;
  start_ = Clock::now();
  drawn_ = finished_ = false;
  done_ = total_ = 0;
  last_width_ = 0;
}

void Progress::Update(uint64_t done, uint64_t total) {
  if (!enabled_ || finished_) return;
  done_ = done;
  total_ = total;
  const auto now = Clock::now();
  if (drawn_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  Draw();
}

void Progress::Finish() {
  if (!enabled_ || finished_) return;
  Draw();
  EndLine();
  finished_ = true;
}

void Progress::Draw() {
  drawn_ = true;
  const double secs = std::chrono::duration<double>(Clock::now() - start_).count();
  const double rate = secs > 0 ? double(done_) / secs : 0;
  std::string line;
  const bool bytes = unit_ == Unit::kBytes;
  if (total_ > 0)
    line = fmt::format("    ({:.2f}/100%)", 100.0 * double(done_) / double(total_));
  else
    line = bytes ? fmt::format("    {}", HumanSize(done_)) : fmt::format("    {} clusters", done_);
  line += bytes ? fmt::format("  {:.1f} MiB/s", rate / (1 << 20)) : fmt::format("  {:.0f} clusters/s", rate);
  if (extra_) {
    std::string e = extra_();
    if (!e.empty()) line += "  " + e;
  }
  if (total_ > 0 && done_ < total_ && rate > 0) {
    const auto left = uint64_t(double(total_ - done_) / rate + 0.5);
    line += fmt::format("  {}:{:02}:{:02} left", left / 3600, left / 60 % 60, left % 60);
  }
  const size_t width = line.size();
  if (width < last_width_) line.append(last_width_ - width, ' ');  // erase the longer old line
  last_width_ = width;
  fmt::print(out_, "\r{}", line);
  std::fflush(out_);
  LineOpen(out_) = true;
}

std::function<std::string()> DedupSoFar(const std::unique_ptr<Image>& img) {
  return [&img]() -> std::string {
    if (!img) return "";
    return "dedup " + WriteRatio(img->write_stats(), "x");
  };
}

}  // namespace qcow2dedup::cli
