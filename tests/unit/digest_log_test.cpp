// dedup/digest_log: full digests of host clusters, in a scratch file.
#include "dedup/digest_log.h"

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>

#include "support/numbered_digest.h"
#include "support/temp_dir.h"

using namespace qcow2dedup;

namespace {

Digest D(uint64_t n) { return testing::NumberedDigest(n); }

// What the log says of every cluster in [0, end) matches the model.
void Same(DigestLog& log, const std::map<uint64_t, Digest>& model, uint64_t end) {
  for (uint64_t c = 0; c < end; ++c) {
    const std::optional<Digest> got = log.Get(c);
    auto it = model.find(c);
    if (it == model.end()) REQUIRE_FALSE(got.has_value());
    else REQUIRE(got == std::optional<Digest>(it->second));
  }
}

}  // namespace

TEST_CASE("digests put in any order read back; forgotten and never-put ones are unknown") {
  testing::TempDir dir;
  DigestLog log(dir.path());
  std::map<uint64_t, Digest> model;
  std::mt19937_64 rng(3);
  auto put = [&](uint64_t c, uint64_t n) {
    log.Put(c, D(n));
    model[c] = D(n);
  };
  CHECK_FALSE(log.Get(5).has_value());  // nothing yet, no file
  for (uint64_t c = 1; c < 5000; ++c) put(c, c);           // ascending, across windows
  for (int i = 0; i < 2000; ++i) put(rng() % 6000, 100000 + i);  // behind, inside and past the window
  put(1 << 20, 7);                                          // far ahead: a hole in between
  for (int i = 0; i < 500; ++i) {
    const uint64_t c = rng() % 6000;
    log.Forget(c);
    model.erase(c);
  }
  log.Forget(1 << 21);  // never put: nothing to do
  Same(log, model, 6000);
  CHECK(log.Get(1 << 20) == std::optional<Digest>(D(7)));
  CHECK_FALSE(log.Get((1 << 20) + 1).has_value());
  CHECK_FALSE(log.Get(1 << 21).has_value());
  log.Clear();
  CHECK_FALSE(log.Get(1).has_value());
  log.Put(1, D(9));
  CHECK(log.Get(1) == std::optional<Digest>(D(9)));
}

TEST_CASE("the scratch file leaves no name behind") {
  testing::TempDir dir;
  {
    DigestLog log(dir.path());
    for (uint64_t c = 0; c < 3000; ++c) log.Put(c, D(c));
    CHECK(log.Get(2999) == std::optional<Digest>(D(2999)));
  }
  CHECK(std::filesystem::is_empty(dir.path()));
}

TEST_CASE("where no scratch file can be made, memory holds the digests") {
  const char* old = std::getenv("TMPDIR");
  const std::string saved = old ? old : "";
  setenv("TMPDIR", "/nonexistent/qcow2dedup", 1);
  DigestLog log("/nonexistent/qcow2dedup-too");
  std::map<uint64_t, Digest> model;
  for (uint64_t c = 0; c < 3000; c += 3) {
    log.Put(c, D(c));
    model[c] = D(c);
  }
  log.Forget(300);
  model.erase(300);
  Same(log, model, 3000);
  if (old) setenv("TMPDIR", saved.c_str(), 1);
  else unsetenv("TMPDIR");
}
