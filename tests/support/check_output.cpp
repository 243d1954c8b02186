#include "support/check_output.h"

#include <nlohmann/json.hpp>

#include <regex>
#include <vector>

namespace testing {
namespace {

std::vector<std::string> SplitLines(const std::string& s) {
  std::vector<std::string> lines;
  size_t at = 0;
  while (at < s.size()) {
    const size_t nl = s.find('\n', at);
    const size_t end = nl == std::string::npos ? s.size() : nl;
    lines.push_back(s.substr(at, end - at));
    at = end + 1;
  }
  return lines;
}

bool StartsWith(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

bool OursOnly(const std::string& line) {
  static const std::regex overlap("^ERROR cluster [0-9]+: .* shares its cluster with other .*");
  return StartsWith(line, "ERROR dedup index") || StartsWith(line, "Repairing dedup index") ||
         StartsWith(line, "ERROR compressed cluster at host offset") ||
         StartsWith(line, "Dedup index not checked") || std::regex_match(line, overlap);
}

}  // namespace

QcowPart QcowPartOf(const std::string& out, const std::string& err, bool json) {
  QcowPart p;
  if (json) {
    auto j = nlohmann::ordered_json::parse(out, nullptr, false);
    if (j.is_object()) {
      if (j.contains("dedup")) {
        const auto& d = j["dedup"];
        p.ours_found_more = d.value("in-sync", false) &&
                            (d.value("mismatched", 0) + d.value("stale", 0) + d.value("missing", 0) > 0 ||
                             (d.value("present", false) && !d.value("index-loaded", false)));
      }
      p.ours_found_more |= j.value("metadata-overlaps", 0) > 0 || j.value("bad-compressed-clusters", 0) > 0;
      j.erase("dedup");
      j.erase("metadata-overlaps");
      j.erase("bad-compressed-clusters");
    }
    p.out = j.is_discarded() ? out : j.dump(4) + "\n";
  } else {
    p.ours_found_more = out.find("corruptions were found in the dedup metadata.") != std::string::npos ||
                        out.find("metadata overlaps were found that qemu-img does not count.") != std::string::npos ||
                        out.find("compressed clusters do not decompress.") != std::string::npos;
    for (const std::string& line : SplitLines(out)) {
      if (StartsWith(line, "Dedup")) break;
      const bool ours_clean = line == "No errors were found in the qcow2 structure." ||
                              line == "No errors that qemu-img counts were found on the image.";
      p.out += (ours_clean ? std::string("No errors were found on the image.") : line) + "\n";
    }
  }
  for (const std::string& line : SplitLines(err)) {
    if (StartsWith(line, "qemu-img: ") || StartsWith(line, "qcow2dedup: ")) {
      p.err += "(the tool's failure line)\n";
      break;
    }
    if (!OursOnly(line)) p.err += line + "\n";
  }
  return p;
}

int ExpectedCheckExit(int qemu_exit, const QcowPart& ours) {
  return ours.ours_found_more && qemu_exit != 1 ? 2 : qemu_exit;
}

}  // namespace testing
