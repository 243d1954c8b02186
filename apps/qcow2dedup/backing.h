// -b/-B BASE and -F FORMAT (create, convert): the base of an overlay,
// named and checked the way qemu-img 7.2 does.
#pragma once

#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "qcow2dedup/image.h"

namespace qcow2dedup::cli {

struct BackingArgs {
  std::string name;    // as given, and as the header stores it
  std::string format;  // -F: raw or qcow2
  CLI::Option* flag = nullptr;  // -b or -B, to tell "-b ''" from no -b
  bool given() const { return (flag && flag->count() > 0) || !format.empty(); }
};

// Adds `flag` (-b for create, -B for convert) and -F.
void AddBackingOptions(CLI::App& app, const std::string& flag, BackingArgs& args);

// Opens the base of the overlay at `overlay` read-only (a relative name is
// relative to the overlay's directory, as QEMU resolves it), after
// qemu-img's checks: a name and a format, each with the other; the format
// is required (qemu-img 7.2 refuses to probe it) and must be what the file
// is. On failure prints one line naming the overlay and returns nullptr.
std::unique_ptr<BlockDevice> OpenBase(const std::string& overlay, const BackingArgs& args);

}  // namespace qcow2dedup::cli
