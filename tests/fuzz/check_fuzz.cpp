// libFuzzer target: check (and repair, in memory) an arbitrary image.
// Beyond no crash and no sanitizer report: when `check -r all` says the
// image is clean now (exit code 0, as the CLI would print), a fresh check
// of the repaired bytes must agree, and the image must open (but see the
// known differences below).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "qcow2dedup/check.h"
#include "fuzz/shared_file.h"

namespace {

using namespace qcow2dedup;

[[noreturn]] void Fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "check_fuzz: %s: %s\n", what, detail.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  for (RepairMode mode : {RepairMode::kNone, RepairMode::kAll}) {
    auto file = std::make_shared<testing::MemoryFile>(std::vector<uint8_t>(data, data + size));
    CheckOptions o;
    o.repair = mode;
    o.file = std::make_unique<testing::SharedFile>(file);
    auto r = CheckImage("fuzz.qcow2", std::move(o));
    if (mode != RepairMode::kAll || !r.ok() || CheckExitCode(*r) != 0) continue;

    CheckOptions again;
    again.file = std::make_unique<testing::MemoryFile>(file->bytes());
    auto a = CheckImage("fuzz.qcow2", std::move(again));
    if (!a.ok()) Fail("a repaired image that check -r all calls clean cannot be checked", a.status().message());
    if (CheckExitCode(*a) != 0) {
      std::string m = "corruptions " + std::to_string(a->corruptions) + ", leaks " + std::to_string(a->leaks);
      for (const Finding& f : a->findings) m += "\n  " + f.text;
      Fail("check -r all called the image clean, a second check does not", m);
    }
    OpenOptions oo;
    oo.follow_backing = false;
    oo.file = std::make_unique<testing::MemoryFile>(file->bytes());
    auto img = Image::Open("fuzz.qcow2", std::move(oo));
    // Known and deliberate: Image::Open refuses L2 tables and data past the
    // end of the file (a truncated image), which QEMU reads as zeros and
    // its check, so ours, lets pass (the L1 and refcount tables it reads as
    // zeros, as QEMU); a version 3 header_length that is not a multiple of
    // 8, which QEMU and its check accept (CheckUsable); and backing files,
    // not followed here.
    if (!img.ok() && img.status().kind() != ErrorKind::kUnsupported &&
        img.status().message().find("beyond the end of the file") == std::string::npos &&
        img.status().message().find("bad header_length") == std::string::npos)
      Fail("a repaired image that check calls clean does not open", img.status().message());
  }
  return 0;
}
