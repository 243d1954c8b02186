// check: open, examine, and when asked repair and examine again, the way
// qemu-img check -r does it (the fixed counts come from the repairing pass,
// the rest of the report from the check that follows it).
//
// The dedup index is judged apart from the qcow2 structure: its findings do
// not enter `corruptions` (which therefore matches qemu-img's count for the
// same file), but an in-sync index that is wrong makes the exit code 2.
#include <fmt/format.h>

#include "check/index_audit.h"
#include "check/passes.h"
#include "format/endian.h"
#include "qcow2dedup/check.h"

namespace qcow2dedup {
namespace check {
namespace {

struct Examination {
  PassResult pass;
  std::vector<HashedCluster> hashed;
  CheckReport index_notes;
};

Result<Examination> Examine(Context& ctx, const ProgressFn& progress) {
  QD_ASSIGN_OR_RETURN(PassResult pass, RunPass(ctx, RepairMode::kNone));
  Examination e{std::move(pass), {}, {}};
  QD_ASSIGN_OR_RETURN(e.hashed, HashDataClusters(ctx, e.pass.refs, progress));
  QD_RETURN_IF_ERROR(AuditIndex(ctx, e.hashed, e.pass.report.dedup, e.index_notes));
  return e;
}

CheckReport Report(Examination& e) {
  CheckReport r = std::move(e.pass.report);
  for (std::string& m : e.index_notes.messages) Note(r, std::move(m));
  return r;
}

// Parses the header as QEMU's check sees it. The library's parser refuses
// tables at offset 0, an empty refcount table and tables past the end of
// the file; QEMU opens such an image and its check reports the damage (it
// refuses only offsets past INT64_MAX). So the parser gets a copy with
// those fields made harmless, and the real values are put back after.
Result<Header> ParseLeniently(std::vector<uint8_t> head, uint64_t file_size) {
  constexpr uint64_t kQemuLimit = uint64_t(INT64_MAX);
  const bool room = head.size() >= 72;
  uint32_t cluster_bits = 0;
  uint64_t l1 = 0, reftable = 0, snapshots = 0;
  uint32_t reftable_clusters = 0;
  if (room) {
    cluster_bits = uint32_t(LoadBe64(&head[16]) & 0xffffffffu);
    l1 = LoadBe64(&head[40]);
    reftable = LoadBe64(&head[48]);
    reftable_clusters = uint32_t(LoadBe64(&head[52]) & 0xffffffffu);
    snapshots = LoadBe64(&head[64]);
    if (cluster_bits >= kMinClusterBits && cluster_bits <= kMaxClusterBits) {
      const uint64_t cs = 1ull << cluster_bits;
      if (l1 == 0) StoreBe64(&head[40], cs);
      if (reftable == 0) StoreBe64(&head[48], cs);
      if (reftable_clusters == 0) head[59] = 1;
      if (snapshots == 0) StoreBe64(&head[64], cs);
    }
  }
  QD_ASSIGN_OR_RETURN(Header h, ParseHeader(head, std::max(file_size, kQemuLimit)));
  if (room) {
    h.l1_offset = l1;
    h.reftable_offset = reftable;
    h.reftable_clusters = reftable_clusters;
    h.snapshots_offset = snapshots;
  }
  // QEMU refuses a misaligned snapshot table even when there are no snapshots.
  if (h.snapshots_offset % h.cluster_size() || h.snapshots_offset > kQemuLimit - uint64_t(h.nb_snapshots) * 40)
    return Status::Corruption("snapshot table offset invalid");
  return h;
}

Status OpenContext(Context& ctx) {
  QD_ASSIGN_OR_RETURN(ctx.file_size, ctx.file->Size());
  std::vector<uint8_t> head(std::min<uint64_t>(ctx.file_size, 1u << kMaxClusterBits));
  QD_RETURN_IF_ERROR(ctx.file->ReadAt(0, head));
  QD_ASSIGN_OR_RETURN(ctx.header, ParseLeniently(std::move(head), ctx.file_size));
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
  if (r.leaks || r.corruptions || r.check_errors) return true;
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
  const bool clean = !f.corruptions && !f.check_errors;

  // QEMU marks the image clean and consistent when the repair left no
  // corruption; otherwise it stays as it was.
  const uint64_t new_incompatible = clean ? incompatible & ~(kIncompatDirty | kIncompatCorrupt) : incompatible;
  // The refcount fixes of -r leaks leave data and index alone, so an index
  // that was right stays right; -r all may rebuild the refcount structure
  // where the index lay, and rebuilds the index instead.
  const bool keep_index = mode == RepairMode::kLeaks && before.in_sync && before.index_loaded && !before.errors();
  QD_RETURN_IF_ERROR(WriteFeatureBits(ctx, new_incompatible, keep_index ? autoclear : autoclear & ~kAutoclearDedupInSync));

  QD_ASSIGN_OR_RETURN(Examination last, Examine(ctx, progress));
  bool rebuilt = false;
  if (mode == RepairMode::kAll && clean && ctx.header.dedup && !last.pass.report.corruptions &&
      !last.pass.report.check_errors) {
    StoredRefcounts stored(ctx);
    QD_RETURN_IF_ERROR(stored.Load());
    QD_RETURN_IF_ERROR(SaveRebuiltIndex(ctx, last.hashed, stored));
    last.index_notes = CheckReport{};
    QD_RETURN_IF_ERROR(AuditIndex(ctx, last.hashed, last.pass.report.dedup, last.index_notes));
    rebuilt = true;
  }

  CheckReport r;
  // What the rebuild mended, worded as qemu-img words a mended finding.
  if (rebuilt)
    for (std::string& m : first.index_notes.messages)
      Note(r, m.starts_with("ERROR ") ? "Repairing " + m.substr(6) : std::move(m));
  for (std::string& m : moved.messages) Note(r, std::move(m));
  for (const std::string& m : f.messages) Note(r, m);
  CheckReport final_report = Report(last);
  for (std::string& m : final_report.messages) Note(r, std::move(m));
  final_report.messages = std::move(r.messages);
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
    // we, before writing anything.
    r = check::Report(first);
    check::Note(r, "ERROR need to rebuild refcount structures");
    ++r.check_errors;
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
  if (r.corruptions || r.dedup.errors()) return 2;
  if (r.leaks) return 3;
  return 0;
}

}  // namespace qcow2dedup
