// ParseSize against qemu-img 7.2's own parse of the same text: every size
// below was given to `qemu-img create` and its "size=" (or its refusal) is
// the expected value. A judge test (qemu-img itself) is in tests/golden.
#include <doctest/doctest.h>

#include "size.h"

using qcow2dedup::ErrorKind;
using qcow2dedup::ParseSize;
using qcow2dedup::ParseSizeInRange;

TEST_CASE("ParseSize takes what qemu-img takes, with the same bytes") {
  const std::pair<const char*, uint64_t> ok[] = {
      {"0", 0},
      {"512", 512},
      {"1K", 1024},
      {"1k", 1024},
      {" 1k", 1024},                          // strtoull skips leading blanks
      {"1.5G", 1610612736},
      {"1.5M", 1572864},
      {"0.5k", 512},
      {"1.2345k", 1264},                      // 1264.128: rounded to the byte
      {"1.0007k", 1025},                      // 1024.7168: half a byte and more rounds up
      {"1.k", 1024},                          // a point without digits
      {"1.0b", 1},
      {"0x10", 16},
      {"0x10k", 16384},                       // deprecated, still taken (with a warning)
      {"4t", 4398046511104},
      {"7E", 8070450532247928832},
      {"9223372036854775808", 9223372036854775808u},  // the range check is ParseSizeInRange's
  };
  for (const auto& item : ok) {
    const auto text = item.first;  // not a binding: clang 14 cannot capture one in CAPTURE
    const auto bytes = item.second;
    CAPTURE(text);
    auto r = ParseSize(text);
    REQUIRE(r.ok());
    CHECK(*r == bytes);
  }
}

TEST_CASE("ParseSize refuses what qemu-img refuses") {
  for (const char* text : {"", "1.5", "0.1", "1.5b", "10Q", "1kB", "1KiB", "1e3", "1.5e3k", "-1", "0x10.5", "0x",
                           "1k ", "1.5 ", ".5k", "k"}) {
    CAPTURE(text);
    auto r = ParseSize(text);
    REQUIRE(!r.ok());
    CHECK(r.status().kind() == ErrorKind::kInvalidArgument);
  }
  for (const char* text : {"16E", "18446744073709551616"}) {
    CAPTURE(text);
    auto r = ParseSize(text);
    REQUIRE(!r.ok());
    CHECK(r.status().kind() == ErrorKind::kUnsupported);
  }
}

TEST_CASE("ParseSizeInRange words its errors as qemu-img's cvtnum") {
  auto bad = ParseSizeInRange("image size", "10Q", 0, INT64_MAX);
  REQUIRE(!bad.ok());
  CHECK(bad.status().message() ==
        "Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
        "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
  for (const char* text : {"8E", "18446744073709551616"}) {
    auto big = ParseSizeInRange("image size", text, 0, INT64_MAX);
    REQUIRE(!big.ok());
    CHECK(big.status().message() == "Invalid image size specified. Must be between 0 and 9223372036854775807.");
  }
  auto fine = ParseSizeInRange("image size", "8E", 0, UINT64_MAX);
  REQUIRE(fine.ok());
  CHECK(*fine == uint64_t(8) << 60);
}
