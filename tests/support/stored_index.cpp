#include "support/stored_index.h"

#include <doctest/doctest.h>

#include "dedup/index_table.h"
#include "qcow2dedup/file.h"

namespace testing {
using namespace qcow2dedup;

qcow2dedup::Header RewriteStoredIndex(const std::string& path, const std::function<void(qcow2dedup::DedupIndex&)>& f) {
  auto file = OpenPosixFile(path, OpenMode::kReadWrite);
  REQUIRE(file.ok());
  const uint64_t size = *(*file)->Size();
  std::vector<uint8_t> head(std::min<uint64_t>(size, 1 << 21));
  REQUIRE((*file)->ReadAt(0, head).ok());
  auto h = ParseHeader(head, size);
  REQUIRE_MESSAGE(h.ok(), h.status().message());
  DedupIndex index;
  auto loaded = ReadIndexTable(**file, *h, size, index);
  REQUIRE(loaded.ok());
  REQUIRE_MESSAGE(*loaded, "the image's stored index cannot be read");
  f(index);
  // A table no larger than before: the same place takes it.
  REQUIRE(IndexBucketsFor(index.size()) <= h->dedup->index_buckets);
  REQUIRE((*file)->WriteAt(h->dedup->index_offset,
                           std::vector<uint8_t>(IndexTableBytes(h->dedup->index_buckets), 0)).ok());
  auto ext = WriteIndexTable(**file, index, h->dedup->index_offset);
  REQUIRE(ext.ok());
  h->dedup = *ext;
  auto bytes = EncodeHeader(*h);
  REQUIRE(bytes.ok());
  REQUIRE((*file)->WriteAt(0, *bytes).ok());
  return *h;
}

}  // namespace testing
