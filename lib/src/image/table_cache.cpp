#include "image/table_cache.h"

namespace qcow2dedup {

TableCache::TableCache(File* file, uint64_t table_bytes, uint64_t capacity_tables,
                       std::function<Status(uint64_t)> check_write)
    : file_(file),
      table_bytes_(table_bytes),
      capacity_(std::max<uint64_t>(capacity_tables, 4)),
      check_write_(std::move(check_write)) {}

Result<TableCache::Table*> TableCache::Get(uint64_t offset) {
  auto it = map_.find(offset);
  if (it != map_.end()) {
    lru_.splice(lru_.begin(), lru_, it->second);
    return &it->second->data;
  }
  return Insert(offset, true);
}

Result<TableCache::Table*> TableCache::Create(uint64_t offset) {
  auto it = map_.find(offset);
  if (it != map_.end()) {
    std::fill(it->second->data.begin(), it->second->data.end(), 0);
    lru_.splice(lru_.begin(), lru_, it->second);
    return &it->second->data;
  }
  return Insert(offset, false);
}

Result<TableCache::Table*> TableCache::Insert(uint64_t offset, bool read) {
  MakeRoom();
  Entry e{offset, Table(table_bytes_, 0)};
  if (read) QD_RETURN_IF_ERROR(file_->ReadAt(offset, e.data));
  lru_.push_front(std::move(e));
  map_[offset] = lru_.begin();
  return &lru_.front().data;
}

void TableCache::MakeRoom() {
  for (auto it = lru_.rbegin(); map_.size() >= capacity_ && it != lru_.rend();) {
    if (it->dirty) {
      ++it;
      continue;
    }
    map_.erase(it->offset);
    it = std::make_reverse_iterator(lru_.erase(std::next(it).base()));
  }
}

void TableCache::MarkDirty(uint64_t offset) {
  auto it = map_.find(offset);
  if (it != map_.end() && !it->second->dirty) {
    it->second->dirty = true;
    ++dirty_count_;
  }
}

Status TableCache::WriteBack() {
  if (dirty_count_ == 0) return Status::Ok();
  // In offset order, so the writes stream.
  std::vector<Entry*> dirty;
  for (auto& e : lru_)
    if (e.dirty) dirty.push_back(&e);
  std::sort(dirty.begin(), dirty.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (Entry* e : dirty) {
    QD_RETURN_IF_ERROR(check_write_(e->offset));
    QD_RETURN_IF_ERROR(file_->WriteAt(e->offset, e->data));
    e->dirty = false;
    --dirty_count_;
  }
  return Status::Ok();
}

}  // namespace qcow2dedup
