// What every subcommand prints with: error lines, sizes for humans, JSON
// laid out the way qemu-img lays it out, and aligned tables.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "qcow2dedup/image.h"
#include "qcow2dedup/status.h"

namespace qcow2dedup::cli {

using Json = nlohmann::ordered_json;

// Prints "qcow2dedup: WHAT: message" (or "qcow2dedup: message" when what is
// empty) on stderr and returns the exit code 1.
int Fail(std::string_view what, const Status& status);
int Fail(std::string_view what, std::string_view message);

// Prints "qcow2dedup: WHAT: warning: message" on stderr; the command goes on.
void Warn(std::string_view what, std::string_view message);

// True while a progress line waits on stderr without its newline: Fail
// ends it first so that the error gets a line of its own.
extern bool g_stderr_line_open;
// The same for a progress line on stdout (convert -p, as qemu-img's).
extern bool g_stdout_line_open;

// How error lines name a file argument: "-" is "standard input".
std::string DisplayName(const std::string& path);

// qemu's size_to_str: "0 B", "196 KiB", "1.5 GiB" (three significant digits).
std::string HumanSize(uint64_t bytes);
// "1 GiB (1073741824 bytes)", as qemu-img info prints the virtual size.
std::string SizeWithBytes(uint64_t bytes);

// Reorders a JSON object's keys the way QEMU's QDict iterates them, so that
// our output is byte-for-byte what qemu-img prints for the same keys. Insert
// the keys in QAPI declaration order: it decides the order within a bucket.
Json QemuOrder(const Json& object);

// Prints with a 4-space indent and a final newline, as qemu-img does.
void PrintJson(const Json& j);

// Rows of cells; each column padded to its widest cell. Columns whose bit is
// set in right_aligned are right-aligned (numbers). Lines start with indent.
void PrintTable(const std::vector<std::vector<std::string>>& rows, uint32_t right_aligned,
                std::string_view indent = "");

// "dedup: N clusters written, M stored, K shared (ratio X.XX)" on stderr.
void PrintWriteSummary(const WriteStats& stats);
// Non-zero data clusters per stored cluster in a write session, with suffix
// ("2.67x"), or "all shared" when nothing new was stored.
std::string WriteRatio(const WriteStats& stats, std::string_view suffix);

// "human" or "json", the values of --output.
enum class OutputFormat { kHuman, kJson };

}  // namespace qcow2dedup::cli
