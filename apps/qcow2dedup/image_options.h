// The "-o key=value,..." options that create and convert share, with
// qemu-img's names so that scripts written for qemu-img keep working.
#pragma once

#include <string>
#include <vector>

#include "qcow2dedup/image.h"
#include "qcow2dedup/status.h"

namespace qcow2dedup::cli {

struct ImageOptions {
  CreateOptions create;
  bool verify = false;  // convert's -o verify=on
  uint64_t index_memory = 0;  // convert's -o index_memory=SIZE (0: no cap)
};

// Applies each -o argument in turn (later keys win, as in qemu-img).
// allow_verify: only convert knows verify=on|off.
Status ParseImageOptions(const std::vector<std::string>& args, bool allow_verify, ImageOptions& out);

// Warns (one line on stderr) when o's refcount width leaves no room for
// sharing at all (see ShareLimit): such an image stores every cluster.
void WarnIfNoSharing(const std::string& path, const CreateOptions& o);

// write, serve, dedup and convert -n: -o takes index_memory=SIZE alone
// (0 in index_memory when absent: no cap).
Status ParseSessionOptions(const std::vector<std::string>& args, uint64_t& index_memory);
// Whether every -o item is index_memory=... (convert -n takes no other).
bool OnlySessionOptions(const std::vector<std::string>& args);
// Prints what their -o takes and throws CLI::Success, as PrintImageOptionsHelp.
[[noreturn]] void PrintSessionOptionsHelp();

// qemu-img's has_help_option: one of the comma-separated items of an -o
// argument is "help" or "?".
bool AsksForHelp(const std::string& arg);

// Prints what -o takes, in qemu-img's "-o help" layout, and throws
// CLI::Success (help is success, and needs no other argument).
// allow_verify: convert's list, with verify=on|off.
[[noreturn]] void PrintImageOptionsHelp(bool allow_verify);
// The same for -O raw: qemu-img's list for raw.
[[noreturn]] void PrintRawOptionsHelp();

// qemu-img create's "Formatting 'FILE', fmt=qcow2 cluster_size=..." line.
std::string FormattingLine(const std::string& path, const CreateOptions& o);

}  // namespace qcow2dedup::cli
