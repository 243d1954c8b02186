// check: qemu-img check's report and exit codes, plus what we found about
// the dedup index.
#include <fmt/format.h>

#include "commands.h"
#include "progress.h"
#include "qcow2dedup/check.h"

namespace qcow2dedup::cli {
namespace {

struct {
  std::string file;
  RepairMode repair = RepairMode::kNone;
  OutputFormat output = OutputFormat::kHuman;
  bool progress = false, quiet = false, force_share = false;
} opts;

// qemu-img check's exit code for a format without checks (raw).
constexpr int kNoChecks = 63;

// The hash pass over the data, beside what the index says: stored clusters
// are the plain copies (the only ones the index holds); compressed copies,
// when there are any, are named apart; duplicates count both kinds.
std::string DedupLine(const DedupFindings& d) {
  const std::string stored =
      d.compressed_clusters ? fmt::format("{} stored clusters and {} compressed ones", d.stored_clusters,
                                          d.compressed_clusters)
                            : fmt::format("{} stored clusters", d.stored_clusters);
  if (!d.present) return fmt::format("Dedup index: none; {}, {} duplicate clusters", stored, d.duplicates);
  std::string rebuilt = d.rebuilt ? "; rebuilt from the data" : "";
  // Only when a cap was reached: most images never have one.
  if (d.memory_misses)
    rebuilt += fmt::format("; {} index memory misses (duplicates stored for lack of index memory, at most)",
                           d.memory_misses);
  // An index out of sync is not consulted, so only the data's side counts.
  if (!d.in_sync)
    return fmt::format("Dedup index: not in sync (the next write rebuilds it); {}, {} duplicate clusters{}", stored,
                       d.duplicates, rebuilt);
  // The entries are for the plain copies only.
  const std::string aside =
      d.compressed_clusters ? fmt::format(" ({} compressed ones are not indexed)", d.compressed_clusters) : "";
  return fmt::format(
      "Dedup index: {}; {} entries for {} stored clusters{}; {} mismatched, {} stale, {} missing, {} duplicate "
      "clusters{}",
      d.index_loaded ? "in sync" : "in sync but unreadable", d.indexed, d.stored_clusters, aside, d.mismatched,
      d.stale, d.missing, d.duplicates, rebuilt);
}

// Findings qemu-img does not make: overlaps it cannot see, compressed data
// it does not read, and anything about the dedup index.
bool IsOurs(const Finding& f) {
  return f.area == FindingArea::kOverlaps || f.area == FindingArea::kDedupIndex ||
         f.area == FindingArea::kCompressedData;
}

// Every finding on stderr, as qemu-img check prints them (with -q and
// --output=json too): first qemu-img's lines, in qemu-img's order, then ours.
void PrintFindings(const CheckReport& r) {
  for (bool ours : {false, true})
    for (const Finding& f : r.findings)
      if (IsOurs(f) == ours) fmt::print(stderr, "{}\n", f.text);
}

// Two parts on stdout. First qemu-img's dump_human_image_check line for
// line, except that "No errors were found on the image." is not said of
// an image with overlaps qemu-img does not count, compressed data that does
// not decompress or a wrong dedup index.
// Then ours: the dedup index's state, and counts of what is wrong.
void PrintHuman(const CheckReport& r) {
  if (r.leaks_fixed || r.corruptions_fixed)
    fmt::print(
        "The following inconsistencies were found and repaired:\n\n"
        "    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
        r.leaks_fixed, r.corruptions_fixed);
  const uint64_t index_errors = r.dedup.errors();
  if (!r.corruptions && !r.leaks && !r.check_errors) {
    fmt::print("{}\n", r.overlaps       ? "No errors that qemu-img counts were found on the image."
                       : index_errors || r.bad_compressed ? "No errors were found in the qcow2 structure."
                                      : "No errors were found on the image.");
  } else {
    if (r.corruptions)
      fmt::print("\n{} errors were found on the image.\n"
                 "Data may be corrupted, or further writes to the image may corrupt it.\n",
                 r.corruptions);
    if (r.leaks)
      fmt::print("\n{} leaked clusters were found on the image.\n"
                 "This means waste of disk space, but no harm to data.\n",
                 r.leaks);
    if (r.check_errors) fmt::print("\n{} internal errors have occurred during the check.\n", r.check_errors);
  }
  if (r.total_clusters && r.allocated_clusters)
    fmt::print("{}/{} = {:.2f}% allocated, {:.2f}% fragmented, {:.2f}% compressed clusters\n",
               r.allocated_clusters, r.total_clusters, r.allocated_clusters * 100.0 / r.total_clusters,
               r.fragmented_clusters * 100.0 / r.allocated_clusters,
               r.compressed_clusters * 100.0 / r.allocated_clusters);
  if (r.image_end_offset) fmt::print("Image end offset: {}\n", r.image_end_offset);

  fmt::print("{}\n", DedupLine(r.dedup));
  if (r.overlaps)
    fmt::print("\n{} metadata overlaps were found that qemu-img does not count.\n"
               "Data may be corrupted, or further writes to the image may corrupt it.\n",
               r.overlaps);
  if (r.bad_compressed)
    fmt::print("\n{} compressed clusters do not decompress.\n"
               "The guest data in them is lost: reading it fails in QEMU too. No repair can mend it.\n",
               r.bad_compressed);
  if (index_errors)
    fmt::print("\n{} corruptions were found in the dedup metadata.\n"
               "This costs dedup, not data (a write checks an index entry against its cluster before\n"
               "sharing it); 'check -r all' rebuilds the index from the data.\n",
               index_errors);
}

// Keys in QAPI's ImageCheck order; the optional ones only when non-zero.
Json CheckJson(const CheckReport& r) {
  Json j;
  j["filename"] = r.filename;
  j["format"] = "qcow2";
  j["check-errors"] = r.check_errors;
  auto optional = [&j](const char* key, uint64_t v) {
    if (v) j[key] = v;
  };
  optional("image-end-offset", r.image_end_offset);
  optional("corruptions", r.corruptions);
  optional("leaks", r.leaks);
  optional("corruptions-fixed", r.corruptions_fixed);
  optional("leaks-fixed", r.leaks_fixed);
  optional("total-clusters", r.total_clusters);
  optional("allocated-clusters", r.allocated_clusters);
  optional("fragmented-clusters", r.fragmented_clusters);
  optional("compressed-clusters", r.compressed_clusters);
  j = QemuOrder(j);
  const DedupFindings& d = r.dedup;
  j["dedup"] = {{"present", d.present},       {"in-sync", d.in_sync},   {"index-loaded", d.index_loaded},
                {"indexed", d.indexed},       {"stored-clusters", d.stored_clusters},
                {"compressed-clusters", d.compressed_clusters},
                {"mismatched", d.mismatched}, {"stale", d.stale},       {"missing", d.missing},
                {"duplicates", d.duplicates}, {"memory-misses", d.memory_misses},
                {"rebuilt", d.rebuilt}};
  if (r.overlaps) j["metadata-overlaps"] = r.overlaps;
  if (r.bad_compressed) j["bad-compressed-clusters"] = r.bad_compressed;
  return j;
}

}  // namespace

void SetupCheck(CLI::App& app) {
  auto* repair = AddChoiceOption(app, "-r,--repair", opts.repair,
                                 {{"leaks", RepairMode::kLeaks}, {"all", RepairMode::kAll}},
                                 "Repair leaked clusters (leaks) or everything (all)");
  AddOutputOption(app, opts.output);
  app.add_flag("-p,--progress", opts.progress, "Show progress on stderr");
  app.add_flag("-q,--quiet", opts.quiet, "Print nothing on stdout; the exit code tells");
  auto* share = app.add_flag("-U,--force-share", opts.force_share,
                             "Read without QEMU's image lock (the image may be in use)");
  share->excludes(repair);  // repairing writes: it needs the lock
  app.add_option("FILE", opts.file, "The image")->required();
}

int RunCheck() {
  Progress progress(opts.progress && !opts.quiet, Progress::Unit::kClusters);
  CheckOptions o;
  o.repair = opts.repair;
  o.force_share = opts.force_share;
  o.progress = progress.fn();
  auto report = CheckImage(opts.file, std::move(o));
  if (!report.ok()) {
    if (!LooksLikeQcow2(opts.file)) {
      Fail(opts.file, "this image format does not support checks");
      return kNoChecks;
    }
    return Fail(opts.file, report.status());
  }
  progress.Finish();
  PrintFindings(*report);
  // A check that gave up half way has no summary, in qemu-img either.
  if (!opts.quiet && !report->stopped) {
    if (opts.output == OutputFormat::kJson) PrintJson(CheckJson(*report));
    else PrintHuman(*report);
  }
  if (report->stopped)
    Fail(opts.file, "the check could not complete");
  else if (report->check_errors)
    Fail(opts.file, fmt::format("the check could not complete ({} internal errors)", report->check_errors));
  return CheckExitCode(*report);
}

}  // namespace qcow2dedup::cli
