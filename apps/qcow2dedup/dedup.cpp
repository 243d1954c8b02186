// dedup: deduplicate an image in place and say what it gave back.
#include <fmt/format.h>

#include "commands.h"
#include "image_options.h"
#include "progress.h"
#include "qcow2dedup/dedup.h"

namespace qcow2dedup::cli {
namespace {

struct {
  std::string image;
  CacheMode cache = CacheMode::kWriteback;
  OutputFormat output = OutputFormat::kHuman;
  bool progress = false;
  bool quiet = false;
  uint64_t flush_interval = 0;
  std::vector<std::string> options;  // -o
} opts;

void PrintHuman(const DedupResult& r) {
  const uint64_t reclaimed = r.disk_usage_before > r.disk_usage_after ? r.disk_usage_before - r.disk_usage_after : 0;
  fmt::print("image: {}\n", r.filename);
  fmt::print("stored data clusters: {} -> {} ({} freed)\n", r.stored_before, r.stored_after, r.freed_clusters);
  fmt::print("guest clusters relinked: {}, zeros no longer stored: {}\n", r.relinked, r.zeroed);
  if (r.unindexed)
    fmt::print("left as they are for lack of index memory (index_memory): {} stored clusters\n", r.unindexed);
  fmt::print("file size: {} -> {}\n", HumanSize(r.file_size_before), HumanSize(r.file_size_after));
  fmt::print("disk usage: {} -> {} ({} reclaimed)\n", HumanSize(r.disk_usage_before), HumanSize(r.disk_usage_after),
             HumanSize(reclaimed));
}

void PrintJsonResult(const DedupResult& r) {
  Json j;
  j["filename"] = r.filename;
  j["cluster-size"] = r.cluster_size;
  j["stored-clusters-before"] = r.stored_before;
  j["stored-clusters-after"] = r.stored_after;
  j["freed-clusters"] = r.freed_clusters;
  j["relinked-clusters"] = r.relinked;
  j["zero-clusters"] = r.zeroed;
  j["memory-misses"] = r.unindexed;
  j["file-size-before"] = r.file_size_before;
  j["file-size-after"] = r.file_size_after;
  j["disk-usage-before"] = r.disk_usage_before;
  j["disk-usage-after"] = r.disk_usage_after;
  PrintJson(j);
}

}  // namespace

void SetupDedup(CLI::App& app) {
  AddCacheOption(app, opts.cache);
  AddOutputOption(app, opts.output);
  AddFlushIntervalOption(app, opts.flush_interval);
  AddSessionOptions(app, opts.options);
  app.add_flag("-p,--progress", opts.progress, "Show progress on stderr");
  app.add_flag("-q,--quiet", opts.quiet, "Print nothing but errors (overrides -p)");
  app.add_option("IMAGE", opts.image, "The qcow2 image to deduplicate in place")->required();
}

int RunDedup() {
  if (opts.quiet) opts.progress = false;
  Progress progress(opts.progress, Progress::Unit::kClusters);
  DedupOptions o;
  if (Status s = ParseSessionOptions(opts.options, o.index_memory); !s.ok()) return Fail(opts.image, s);
  o.cache = opts.cache;
  o.flush_interval = opts.flush_interval;
  bool relinking = false;
  o.hashing = progress.fn();
  o.relinking = [&](uint64_t done, uint64_t total) {
    if (!opts.progress) return;
    if (!relinking) progress.Restart(Progress::Unit::kClusters);
    relinking = true;
    progress.Update(done, total);
  };
  auto r = DeduplicateImage(opts.image, std::move(o));
  progress.Finish();
  if (!r.ok()) return Fail(opts.image, r.status());
  if (opts.quiet) return 0;
  if (opts.output == OutputFormat::kJson) PrintJsonResult(*r);
  else PrintHuman(*r);
  return 0;
}

}  // namespace qcow2dedup::cli
