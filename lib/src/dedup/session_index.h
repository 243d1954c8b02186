// The index a write session sees: the table stored in the image, searched
// where it lies, with this session's changes over it in memory; or, with no
// table (a new image, or one whose index was rebuilt from its data), all of
// it in memory. Either way only what the session changed is written back.
#pragma once

#include <functional>
#include <memory>
#include <optional>

#include "dedup/index.h"
#include "dedup/index_table.h"

namespace qcow2dedup {

class SessionIndex {
 public:
  // Searches this stored table from now on, under the changes made since.
  void Attach(std::unique_ptr<IndexTable> table) { table_ = std::move(table); }
  const IndexTable* table() const { return table_.get(); }
  // Forgets the table and every change: the caller fills memory() anew.
  void Reset();
  // The entries held in memory: all of them when there is no table.
  DedupIndex& memory() { return added_; }
  const DedupIndex& memory() const { return added_; }

  // A host cluster holding data with this digest, if known (the newest copy
  // this session added, else the first one the table names).
  Result<std::optional<uint64_t>> Find(Fingerprint d);
  // Every copy known: this session's, newest first, then the table's.
  Result<std::vector<uint64_t>> FindAll(Fingerprint d);
  // Holds the pair, unless the cap leaves no room for it: then false, and
  // refused() counts it.
  Result<bool> Insert(Fingerprint d, uint64_t cluster);
  // Forgets the pair; false if it was not held.
  Result<bool> Remove(Fingerprint d, uint64_t cluster);
  // The same, by digest. Whichever they name are candidates: their data
  // may have another digest with the same fingerprint.
  Result<std::optional<uint64_t>> Find(const Digest& d) { return Find(FingerprintOf(d)); }
  Result<std::vector<uint64_t>> FindAll(const Digest& d) { return FindAll(FingerprintOf(d)); }
  Result<bool> Insert(const Digest& d, uint64_t cluster) { return Insert(FingerprintOf(d), cluster); }
  Result<bool> Remove(const Digest& d, uint64_t cluster) { return Remove(FingerprintOf(d), cluster); }
  // The pair was not found where it should have been: whatever the table
  // says about that cluster may be wrong, so the index is no longer exact.
  void NoteInexact() { inexact_ = true; }

  // Caps MemoryBytes (-o index_memory; 0: no cap), by the bound on what
  // the entries held can take (DedupIndex::BoundBytes). A pair that does not fit
  // is not held, and the index is no longer exact (so it is not stored,
  // and the next session rebuilds it from the data): a lookup then misses,
  // which costs a duplicate, never data.
  void set_memory_cap(uint64_t bytes) { cap_ = bytes; }
  // Inserts the cap refused since the last Reset.
  uint64_t refused() const { return refused_; }

  uint64_t size() const { return (table_ ? table_->entries() : 0) + added_.size() - removed_.size(); }
  size_t MemoryBytes() const { return added_.MemoryBytes() + removed_.MemoryBytes(); }

  // Writes the changes back: into the stored table in place when it takes
  // them (may_write vets each changed bucket's place first), else as a
  // fresh table wherever place(bytes) puts it. Returns the extension that
  // describes the index, or nothing when the index cannot be stored exactly
  // (then it is rebuilt from the data on the next write).
  using Place = std::function<Result<uint64_t>(uint64_t bytes)>;
  Result<std::optional<DedupExtension>> Store(File& file, const IndexTable::MayWrite& may_write, const Place& place);

 private:
  std::unique_ptr<IndexTable> table_;
  DedupIndex added_;    // pairs not in the table (all pairs, without one)
  DedupIndex removed_;  // pairs in the table that are gone
  bool inexact_ = false;
  uint64_t cap_ = 0;
  uint64_t refused_ = 0;
  // Whether one more pair fits under the cap in to (added_ or removed_):
  // by the bound on their memory, which the entries' count alone sets, so
  // that the cap holds whatever the data and its order.
  bool Fits(const DedupIndex& to) const {
    if (!cap_) return true;
    const DedupIndex& other = &to == &added_ ? removed_ : added_;
    return DedupIndex::BoundBytes(to.size() + 1) + DedupIndex::BoundBytes(other.size()) <= cap_;
  }
};

}  // namespace qcow2dedup
