#include "dedup/session_index.h"

#include <cstring>
#include <vector>

namespace qcow2dedup {

void SessionIndex::Reset() {
  table_.reset();
  added_.Clear();
  removed_.Clear();
  inexact_ = false;
  refused_ = 0;
}

Result<std::optional<uint64_t>> SessionIndex::Find(Fingerprint d) {
  if (auto c = added_.Find(d)) return c;
  std::optional<uint64_t> found;
  if (table_) {
    QD_RETURN_IF_ERROR(table_->ForKey(d, [&](uint64_t c) {
      if (removed_.Contains(d, c)) return true;
      found = c;
      return false;
    }));
  }
  return found;
}

Result<std::vector<uint64_t>> SessionIndex::FindAll(Fingerprint d) {
  std::vector<uint64_t> all = added_.FindAll(d);
  if (table_) {
    QD_RETURN_IF_ERROR(table_->ForKey(d, [&](uint64_t c) {
      if (!removed_.Contains(d, c)) all.push_back(c);
      return true;
    }));
  }
  return all;
}

namespace {

Result<bool> InTable(IndexTable& table, Fingerprint d, uint64_t cluster) {
  bool found = false;
  QD_RETURN_IF_ERROR(table.ForKey(d, [&](uint64_t c) {
    found = c == cluster;
    return !found;
  }));
  return found;
}

}  // namespace

Result<bool> SessionIndex::Insert(Fingerprint d, uint64_t cluster) {
  if (removed_.Remove(d, cluster)) return true;  // back as the table has it
  if (table_) {
    QD_ASSIGN_OR_RETURN(bool stored, InTable(*table_, d, cluster));
    if (stored) return true;
  }
  if (cap_ && !added_.Contains(d, cluster) && !Fits(added_)) {
    ++refused_;
    inexact_ = true;
    return false;
  }
  added_.Insert(d, cluster);
  return true;
}

Result<bool> SessionIndex::Remove(Fingerprint d, uint64_t cluster) {
  if (added_.Remove(d, cluster)) return true;
  if (!table_ || removed_.Contains(d, cluster)) return false;
  QD_ASSIGN_OR_RETURN(bool stored, InTable(*table_, d, cluster));
  if (!stored) return false;
  if (Fits(removed_)) {
    removed_.Insert(d, cluster);
  } else {
    // The table keeps naming the cluster: the writer checks every table
    // entry against the data before it shares one, so this stays safe.
    inexact_ = true;
  }
  return true;
}

Result<std::optional<DedupExtension>> SessionIndex::Store(
    File& file, const IndexTable::MayWrite& may_write, const Place& place) {
  if (inexact_ || (table_ && table_->damaged())) return std::optional<DedupExtension>();
  if (table_) {
    std::vector<IndexTable::Pair> removed, added;
    auto collect = [](const DedupIndex& from, std::vector<IndexTable::Pair>& to) {
      from.ForEach([&](Fingerprint key, uint64_t c) { to.push_back({key, c}); });
    };
    collect(removed_, removed);
    collect(added_, added);
    Status st = table_->Apply(removed, added, may_write);
    if (st.ok()) {
      DedupExtension ext;
      ext.index_offset = table_->offset();
      ext.index_buckets = table_->buckets();
      ext.index_entries = table_->entries();
      return std::optional<DedupExtension>(ext);
    }
    if (st.kind() == ErrorKind::kIOError || st.kind() == ErrorKind::kNoSpace) return st;
    // Too full, or its place is taken: everything moves to a fresh table.
    bool fits = true;
    QD_RETURN_IF_ERROR(table_->ForEach([&](Fingerprint d, uint64_t c) {
      if (removed_.Contains(d, c) || !fits) return;
      if (Fits(added_)) added_.Insert(d, c);
      else fits = false;
    }));
    // Past the cap the index is not stored: the next session rebuilds it.
    if (table_->damaged() || !fits) return std::optional<DedupExtension>();
    table_.reset();
    removed_.Clear();
  }
  if (added_.size() == 0) return std::optional<DedupExtension>(DedupExtension{});
  QD_ASSIGN_OR_RETURN(uint64_t at, place(IndexTableBytes(IndexTableBuckets(added_))));
  QD_ASSIGN_OR_RETURN(DedupExtension ext, WriteIndexTable(file, added_, at));
  return std::optional<DedupExtension>(ext);
}

}  // namespace qcow2dedup
