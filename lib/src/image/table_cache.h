// A write-back cache of cluster-sized metadata tables (L2 tables, refcount
// blocks), keyed by host offset. Dirty tables stay in memory until the
// writer writes them back in the order the format's crash safety needs.
// A cache full of dirty tables never writes back by itself: it grows past
// its capacity, and the writer flushes at the next point where no metadata
// change is half done (over_capacity() tells it to). Writing back from
// inside a table access would run the whole flush in the middle of a change.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "qcow2dedup/file.h"

namespace qcow2dedup {

class TableCache {
 public:
  using Table = std::vector<uint8_t>;
  // check_write vets every write-back against the image's metadata map.
  TableCache(File* file, uint64_t table_bytes, uint64_t capacity_tables,
             std::function<Status(uint64_t offset)> check_write);

  // The table at offset, read from the file on a miss.
  Result<Table*> Get(uint64_t offset);
  // A new table at offset, all zero, not read from the file.
  Result<Table*> Create(uint64_t offset);
  void MarkDirty(uint64_t offset);
  // Writes every dirty table (no sync).
  Status WriteBack();
  bool HasDirty() const { return dirty_count_ > 0; }
  // More tables are held than the capacity: only dirty ones could not go.
  bool over_capacity() const { return map_.size() > capacity_; }
  size_t size() const { return map_.size(); }

 private:
  struct Entry {
    uint64_t offset;
    Table data;
    bool dirty = false;
  };
  using List = std::list<Entry>;
  Result<Table*> Insert(uint64_t offset, bool read);
  // Evicts clean tables, least recently used first, until one more fits.
  void MakeRoom();

  File* file_;
  uint64_t table_bytes_;
  uint64_t capacity_;
  std::function<Status(uint64_t)> check_write_;
  List lru_;  // most recently used first
  std::unordered_map<uint64_t, List::iterator> map_;
  uint64_t dirty_count_ = 0;
};

}  // namespace qcow2dedup
