// check: open, examine, and when asked repair and examine again, the way
// qemu-img check -r does it (the fixed counts come from the repairing pass,
// the rest of the report from the check that follows it).
//
// The dedup index is judged apart from the qcow2 structure: its findings do
// not enter `corruptions` (which therefore matches qemu-img's count for the
// same file), but an in-sync index that is wrong makes the exit code 2. So
// does compressed guest data that does not decompress, which qemu-img check
// never reads: nothing can repair it, and it is reported after any repair.
#include <fmt/format.h>

#include "check/index_audit.h"
#include "check/passes.h"
#include "qcow2dedup/check.h"

namespace qcow2dedup {
namespace check {
namespace {

struct Examination {
  PassResult pass;
  std::vector<HashedCluster> hashed;
  HashedCompressed compressed;
  CheckReport index_notes;
  CheckReport data_notes;  // compressed data that does not decompress
};

Result<Examination> Examine(Context& ctx, const ProgressFn& progress) {
  QD_ASSIGN_OR_RETURN(PassResult pass, RunPass(ctx, RepairMode::kNone));
  Examination e{std::move(pass), {}, {}, {}, {}};
  const References& refs = e.pass.refs;
  // One progress over both kinds of data: the plain clusters, then the
  // compressed copies.
  const uint64_t compressed = refs.active_compressed.size() + refs.snapshot_compressed.size();
  uint64_t plain = 0;
  ProgressFn plain_progress, compressed_progress;
  if (progress) {
    plain_progress = [&](uint64_t done, uint64_t total) { progress(done, total + compressed); };
    compressed_progress = [&](uint64_t done, uint64_t total) { progress(plain + done, plain + total); };
  }
  QD_ASSIGN_OR_RETURN(e.hashed, HashDataClusters(ctx, refs, plain_progress));
  plain = e.hashed.size();
  QD_ASSIGN_OR_RETURN(e.compressed, HashCompressedData(ctx, refs, compressed_progress, e.data_notes));
  e.pass.report.bad_compressed = e.compressed.bad;
  QD_RETURN_IF_ERROR(AuditIndex(ctx, e.hashed, e.compressed, e.pass.report.dedup, e.index_notes));
  return e;
}

CheckReport Report(Examination& e) {
  CheckReport r = std::move(e.pass.report);
  NoteAll(r, e.data_notes);
  NoteAll(r, e.index_notes);
  return r;
}

Status OpenContext(Context& ctx) {
  QD_ASSIGN_OR_RETURN(ctx.file_size, ctx.file->Size());
  if (ctx.file_size < kV2HeaderLength) return Status::Corruption("file too short for a qcow2 header");
  // Past the end of the file QEMU reads zeros, in cluster 0 too.
  std::vector<uint8_t> head(1u << kMaxClusterBits);
  QD_RETURN_IF_ERROR(ctx.Read(0, head));
  // As QEMU's check sees it: tables at offset 0, an empty refcount table
  // and tables past the end are the check's findings, not a reason to stop.
  QD_ASSIGN_OR_RETURN(ctx.header, DecodeHeader(head));
  QD_RETURN_IF_ERROR(ValidateHeader(ctx.header));
  return ReadSnapshots(ctx);
}

Status WriteFeatureBits(Context& ctx, uint64_t incompatible, uint64_t autoclear) {
  if (ctx.header.version < 3) return Status::Ok();  // version 2 has neither field
  QD_RETURN_IF_ERROR(ctx.WriteHeaderField(kHeaderIncompatibleAt, incompatible, 8));
  QD_RETURN_IF_ERROR(ctx.WriteHeaderField(kHeaderAutoclearAt, autoclear, 8));
  QD_RETURN_IF_ERROR(ctx.file->Sync());
  ctx.header.incompatible = incompatible;
  ctx.header.autoclear = autoclear;
  return Status::Ok();
}

bool NeedsRepair(const Context& ctx, const CheckReport& r, RepairMode mode) {
  if (r.leaks || r.corruptions || r.overlaps || r.check_errors) return true;
  if (ctx.header.incompatible & (kIncompatDirty | kIncompatCorrupt)) return true;
  const DedupFindings& d = r.dedup;
  return mode == RepairMode::kAll && d.present && (!d.in_sync || !d.index_loaded || d.errors());
}

Result<CheckReport> Repair(Context& ctx, Examination& first, RepairMode mode, const ProgressFn& progress) {
  const uint64_t incompatible = ctx.header.incompatible, autoclear = ctx.header.autoclear;
  const DedupFindings before = first.pass.report.dedup;
  // Until the repair is done the image says so: a crash half way leaves it
  // dirty (to be repaired again) and its index out of sync (to be rebuilt).
  QD_RETURN_IF_ERROR(WriteFeatureBits(ctx, incompatible | kIncompatDirty, autoclear & ~kAutoclearDedupInSync));

  // What a refcount fix cannot mend goes first: then the pass below
  // counts the references of the mended image.
  CheckReport moved;
  if (mode == RepairMode::kAll) {
    StoredRefcounts stored(ctx);
    QD_RETURN_IF_ERROR(stored.Load());
    FreshClusters fresh(ctx, stored, std::max<uint64_t>(first.pass.refs.counts.End(), 1));
    QD_ASSIGN_OR_RETURN(uint64_t completed, RewriteSnapshotTable(ctx, stored, fresh, moved));
    QD_ASSIGN_OR_RETURN(uint64_t n, MoveDataOffMetadata(ctx, first.pass.refs, stored, fresh, moved));
    (void)completed;
    (void)n;
  }
  QD_ASSIGN_OR_RETURN(PassResult fixed, RunPass(ctx, mode));
  const CheckReport& f = fixed.report;
  const bool clean = !f.corruptions && !f.overlaps && !f.check_errors;

  // QEMU marks the image clean and consistent when the repair left no
  // corruption; otherwise it stays as it was.
  const uint64_t new_incompatible = clean ? incompatible & ~(kIncompatDirty | kIncompatCorrupt) : incompatible;
  // The refcount fixes of -r leaks leave data and index alone, so an index
  // that was right stays right; -r all may rebuild the refcount structure
  // where the index lay, and rebuilds the index instead.
  const bool keep_index = mode == RepairMode::kLeaks && before.in_sync && before.index_loaded && !before.errors();
  QD_RETURN_IF_ERROR(WriteFeatureBits(ctx, new_incompatible, keep_index ? autoclear : autoclear & ~kAutoclearDedupInSync));
  if (f.stopped) {
    // qemu-img does not check again after a repair that gave up.
    CheckReport r = f;
    r.findings = moved.findings;
    NoteAll(r, f);
    return r;
  }

  QD_ASSIGN_OR_RETURN(Examination last, Examine(ctx, progress));
  bool rebuilt = false;
  if (mode == RepairMode::kAll && clean && ctx.header.dedup && !last.pass.report.corruptions &&
      !last.pass.report.overlaps &&
      !last.pass.report.check_errors) {
    StoredRefcounts stored(ctx);
    QD_RETURN_IF_ERROR(stored.Load());
    QD_RETURN_IF_ERROR(SaveRebuiltIndex(ctx, last.hashed, stored));
    last.index_notes = CheckReport{};
    QD_RETURN_IF_ERROR(AuditIndex(ctx, last.hashed, last.compressed, last.pass.report.dedup, last.index_notes));
    rebuilt = true;
  }

  CheckReport r;
  // What the rebuild mended, worded as qemu-img words a mended finding.
  if (rebuilt)
    for (const Finding& m : first.index_notes.findings) Note(r, Mended(m));
  NoteAll(r, moved);
  NoteAll(r, f);
  CheckReport final_report = Report(last);
  // qemu-img checks again only when the repair fixed something; what the
  // second check finds, it prints too. Our own part is always the last
  // examination's.
  const bool fixed_any = f.leaks_fixed || f.corruptions_fixed || moved.corruptions_fixed;
  for (const Finding& m : final_report.findings)
    if (fixed_any || m.area == FindingArea::kDedupIndex || m.area == FindingArea::kOverlaps ||
        m.area == FindingArea::kCompressedData)
      Note(r, m);
  final_report.findings = std::move(r.findings);
  final_report.leaks_fixed = f.leaks_fixed;
  final_report.corruptions_fixed = f.corruptions_fixed + moved.corruptions_fixed;
  final_report.dedup.rebuilt = rebuilt;
  return final_report;
}

}  // namespace
}  // namespace check

Result<CheckReport> CheckImage(const std::string& path, CheckOptions options) {
  const bool repair = options.repair != RepairMode::kNone;
  std::unique_ptr<File> file = std::move(options.file);
  if (!file) {
    QD_ASSIGN_OR_RETURN(file, OpenPosixFile(path, repair ? OpenMode::kReadWrite : OpenMode::kReadOnly));
  }
  if (repair) QD_RETURN_IF_ERROR(file->Lock(LockMode::kExclusive));
  else if (!options.force_share) QD_RETURN_IF_ERROR(file->Lock(LockMode::kShared));
  return CheckFile(*file, path, options.repair, options.progress);
}

Result<CheckReport> CheckFile(File& file, const std::string& name, RepairMode repair, const ProgressFn& progress) {
  check::Context ctx;
  ctx.file = &file;
  ctx.writable = repair != RepairMode::kNone;
  QD_RETURN_IF_ERROR(check::OpenContext(ctx));
  QD_ASSIGN_OR_RETURN(check::Examination first, check::Examine(ctx, progress));
  CheckReport r;
  if (repair == RepairMode::kLeaks && first.pass.needs_rebuild) {
    // Only -r all can rebuild: qemu-img gives up here (exit 1) and so do
    // we, with its findings so far. A -r leaks pass stops at that very
    // point, before it writes anything.
    QD_ASSIGN_OR_RETURN(check::PassResult stop, check::RunPass(ctx, RepairMode::kLeaks));
    r = std::move(stop.report);
    r.dedup = first.pass.report.dedup;
  } else if (ctx.writable && check::NeedsRepair(ctx, first.pass.report, repair)) {
    QD_ASSIGN_OR_RETURN(r, check::Repair(ctx, first, repair, progress));
  } else {
    r = check::Report(first);
  }
  r.filename = name;
  return r;
}

int CheckExitCode(const CheckReport& r) {
  if (r.check_errors) return 1;  // qemu-img: the check could not complete
  if (r.corruptions || r.overlaps || r.bad_compressed || r.dedup.errors()) return 2;
  if (r.leaks) return 3;
  return 0;
}

}  // namespace qcow2dedup
