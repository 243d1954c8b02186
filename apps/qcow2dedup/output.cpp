#include "output.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <tuple>

namespace qcow2dedup::cli {

bool g_stderr_line_open = false;
bool g_stdout_line_open = false;

int Fail(std::string_view what, const Status& status) { return Fail(what, status.message()); }

int Fail(std::string_view what, std::string_view message) {
  if (g_stdout_line_open) std::fputc('\n', stdout);
  g_stdout_line_open = false;
  std::fflush(stdout);  // keep anything printed before the error in order
  if (g_stderr_line_open) std::fputc('\n', stderr);
  g_stderr_line_open = false;
  if (what.empty())
    fmt::print(stderr, "qcow2dedup: {}\n", message);
  else
    fmt::print(stderr, "qcow2dedup: {}: {}\n", what, message);
  return 1;
}

void Warn(std::string_view what, std::string_view message) {
  std::fflush(stdout);
  if (g_stderr_line_open) std::fputc('\n', stderr);
  g_stderr_line_open = false;
  fmt::print(stderr, "qcow2dedup: {}: warning: {}\n", what, message);
}

std::string DisplayName(const std::string& path) { return path == "-" ? "standard input" : path; }

std::string HumanSize(uint64_t bytes) {
  static const char* const kSuffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  // The switch to the next unit happens at 1000 of the current one, not
  // 1024, so that "1000 KiB" is never printed (qemu's rule, e41b509d68a).
  int exp = 0;
  std::frexp(double(bytes) / (1000.0 / 1024.0), &exp);
  const int i = (exp - 1) / 10;
  const uint64_t div = uint64_t(1) << (i * 10);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%0.3g %sB", double(bytes) / double(div), kSuffixes[i]);
  return buf;
}

std::string SizeWithBytes(uint64_t bytes) { return fmt::format("{} ({} bytes)", HumanSize(bytes), bytes); }

namespace {

// QEMU's qdict hash (tdb_hash) and bucket count.
unsigned QdictHash(const std::string& name) {
  unsigned value = 0x238F13AFu * unsigned(name.size());
  for (size_t i = 0; i < name.size(); ++i)
    value = value + (unsigned(static_cast<unsigned char>(name[i])) << (i * 5 % 24));
  return 1103515243u * value + 12345u;
}
constexpr unsigned kQdictBuckets = 512;

}  // namespace

Json QemuOrder(const Json& object) {
  // A QDict walks its buckets in order; each bucket lists the newest key first.
  std::vector<std::tuple<unsigned, long, std::string>> keys;
  long n = 0;
  for (auto it = object.begin(); it != object.end(); ++it)
    keys.emplace_back(QdictHash(it.key()) % kQdictBuckets, -(n++), it.key());
  std::sort(keys.begin(), keys.end());
  Json out = Json::object();
  for (auto& [bucket, order, key] : keys) out[key] = object.at(key);
  return out;
}

namespace {

// qemu's JSON writer opens an empty list on one line and closes it on the
// next, at the indent of the line it opened on: "[\n    ]", not "[]".
std::string QemuEmptyLists(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  size_t line_start = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < text.size()) out += text[++i];
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    if (c == '\n') line_start = out.size() + 1;
    if (c == '[' && i + 1 < text.size() && text[i + 1] == ']') {
      size_t indent = 0;
      while (line_start + indent < out.size() && out[line_start + indent] == ' ') ++indent;
      out += "[\n" + std::string(indent, ' ') + "]";
      ++i;
      continue;
    }
    out += c;
  }
  return out;
}

}  // namespace

void PrintJson(const Json& j) {
  // replace: a file name that is not UTF-8 must not abort the program.
  fmt::print("{}\n", QemuEmptyLists(j.dump(4, ' ', false, Json::error_handler_t::replace)));
}

void PrintTable(const std::vector<std::vector<std::string>>& rows, uint32_t right_aligned,
                std::string_view indent) {
  std::vector<size_t> width;
  for (auto& row : rows)
    for (size_t c = 0; c < row.size(); ++c) {
      if (width.size() <= c) width.resize(c + 1, 0);
      width[c] = std::max(width[c], row[c].size());
    }
  for (auto& row : rows) {
    std::string line(indent);
    for (size_t c = 0; c < row.size(); ++c) {
      if (c) line += "   ";
      const std::string pad(width[c] - row[c].size(), ' ');
      line += (right_aligned >> c) & 1 ? pad + row[c] : row[c] + pad;
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    fmt::print("{}\n", line);
  }
}

std::string WriteRatio(const WriteStats& s, std::string_view suffix) {
  // Data clusters written per cluster stored anew: with none stored, every
  // one was shared and there is no finite ratio to show.
  if (s.new_clusters == 0) return s.dedup_hits ? "all shared" : fmt::format("1.00{}", suffix);
  return fmt::format("{:.2f}{}", double(s.new_clusters + s.dedup_hits) / double(s.new_clusters), suffix);
}

void PrintWriteSummary(const WriteStats& s) {
  fmt::print(stderr, "dedup: {} clusters written, {} stored, {} shared (ratio {})\n", s.clusters_written,
             s.new_clusters, s.dedup_hits, WriteRatio(s, ""));
  if (s.compressed_clusters)
    fmt::print(stderr, "compressed: {} of the stored clusters, into {} bytes\n", s.compressed_clusters,
               s.compressed_bytes);
  if (s.unindexed_clusters)
    fmt::print(stderr, "not indexed for lack of index memory (index_memory): {} of the stored clusters\n",
               s.unindexed_clusters);
}

}  // namespace qcow2dedup::cli
