// For tests that plant a wrong dedup index: rewrites an image's stored
// index table through f, in its place, with the header still vouching for
// it (in sync, the new entry count).
#pragma once

#include <functional>
#include <string>

#include "dedup/index.h"
#include "format/header.h"

namespace testing {

// f sees every stored entry and may change them; the result is written
// back at the table's offset. Returns the header written.
qcow2dedup::Header RewriteStoredIndex(const std::string& path, const std::function<void(qcow2dedup::DedupIndex&)>& f);

}  // namespace testing
