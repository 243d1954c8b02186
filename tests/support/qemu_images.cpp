#include "support/qemu_images.h"

#include <sys/stat.h>

#include <doctest/doctest.h>

#include <fstream>
#include <random>
#include <sstream>

namespace testing::images {

using nlohmann::json;

RunResult MustRun(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO("command: ", cmd);
  INFO("stdout: ", r.out);
  INFO("stderr: ", r.err);
  REQUIRE(r.exit_code == 0);
  return r;
}

std::string InDir(const std::string& dir, const std::string& cmd) {
  if (dir.empty()) return cmd;
  return "cd " + Sh(dir) + " && " + cmd;
}

void QemuIo(const std::string& image, const std::vector<std::string>& commands, const std::string& format,
            const std::string& cwd) {
  std::string cmd = "qemu-io -f " + Sh(format);
  for (const std::string& c : commands) cmd += " -c " + Sh(c);
  cmd += " " + Sh(image);
  RunResult r = MustRun(InDir(cwd, cmd));
  INFO("command: ", cmd);
  INFO("stdout: ", r.out);
  // Older qemu-io exits 0 when a command fails: look at what it printed too.
  REQUIRE(r.out.find("failed") == std::string::npos);
}

static json ParseJson(const std::string& cmd, const RunResult& r) {
  INFO("command: ", cmd);
  INFO("stdout: ", r.out);
  INFO("stderr: ", r.err);
  json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  REQUIRE_MESSAGE(!j.is_discarded(), "output is not JSON");
  REQUIRE(j.is_object());
  return j;
}

json QemuInfo(const std::string& image, const std::string& cwd) {
  std::string cmd = InDir(cwd, "qemu-img info --output=json " + Sh(image));
  return ParseJson(cmd, MustRun(cmd));
}

json OurInfo(const std::string& image, const std::string& cwd) {
  std::string cmd = InDir(cwd, Tool() + " info --output=json " + Sh(image));
  return ParseJson(cmd, MustRun(cmd));
}

// Keys of qemu-img info's top level that we compare, and those of
// format-specific.data.
static const char* const kTopKeys[] = {"virtual-size",          "filename",     "cluster-size",
                                       "format",                "dirty-flag",   "backing-filename",
                                       "full-backing-filename", "actual-size",  "backing-filename-format"};
static const char* const kDataKeys[] = {"compat",  "compression-type", "lazy-refcounts", "refcount-bits",
                                        "corrupt", "extended-l2"};

static void CompareKey(const json& ours, const json& qemu, const std::string& key, const std::string& where) {
  bool in_qemu = qemu.contains(key), in_ours = ours.contains(key);
  if (in_qemu) {
    CHECK_MESSAGE(in_ours, where, key, ": qemu-img prints ", qemu[key].dump(), ", qcow2dedup leaves it out");
    if (in_ours)
      CHECK_MESSAGE(ours[key] == qemu[key], where, key, ": qcow2dedup ", ours[key].dump(), " qemu-img ",
                    qemu[key].dump());
  } else {
    CHECK_MESSAGE(!in_ours, where, key, ": qcow2dedup prints ", (in_ours ? ours[key].dump() : ""),
                  ", qemu-img leaves it out");
  }
}

void CompareInfo(const json& ours, const json& qemu) {
  INFO("qcow2dedup: ", ours.dump());
  INFO("qemu-img:   ", qemu.dump());
  for (const char* k : kTopKeys) CompareKey(ours, qemu, k, "");

  // Snapshots: the same list in the same order, each with qemu-img's values.
  json qs = qemu.value("snapshots", json::array());
  json os = ours.value("snapshots", json::array());
  CHECK_MESSAGE(os.is_array(), "snapshots is not an array");
  if (os.is_array() && qs.is_array()) {
    CHECK_MESSAGE(os.size() == qs.size(), "snapshot count: qcow2dedup ", os.size(), " qemu-img ", qs.size());
    for (size_t i = 0; i < std::min(os.size(), qs.size()); ++i) {
      for (auto it = qs[i].begin(); it != qs[i].end(); ++it)
        CompareKey(os[i], qs[i], it.key(), "snapshots[" + std::to_string(i) + "].");
    }
  }

  json qd = qemu.contains("format-specific") ? qemu["format-specific"] : json::object();
  json od = ours.contains("format-specific") ? ours["format-specific"] : json::object();
  CHECK_MESSAGE(od.value("type", "") == qd.value("type", ""), "format-specific.type");
  json qdata = qd.value("data", json::object());
  json odata = od.value("data", json::object());
  for (const char* k : kDataKeys) CompareKey(odata, qdata, k, "format-specific.data.");
}

std::string ReadBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void WriteBytes(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(data.data(), std::streamsize(data.size()));
  REQUIRE_MESSAGE(f.good(), "cannot write ", path);
}

void PatchFile(const std::string& path, uint64_t offset, const std::string& bytes) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  REQUIRE_MESSAGE(f.is_open(), "cannot open ", path);
  f.seekp(std::streamoff(offset));
  f.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE_MESSAGE(f.good(), "cannot patch ", path);
}

bool FileExists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

std::string BE16(uint16_t v) { return {char(v >> 8), char(v)}; }
std::string BE32(uint32_t v) { return BE16(uint16_t(v >> 16)) + BE16(uint16_t(v)); }
std::string BE64(uint64_t v) { return BE32(uint32_t(v >> 32)) + BE32(uint32_t(v)); }

uint64_t GetBE(const std::string& data, size_t offset, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | uint8_t(data.at(offset + size_t(i)));
  return v;
}

uint64_t AllocatedBytes(const std::string& path) {
  struct stat st;
  REQUIRE_MESSAGE(stat(path.c_str(), &st) == 0, "cannot stat ", path);
  return uint64_t(st.st_blocks) * 512;
}

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::string s(n, '\0');
  for (char& c : s) c = char(gen() & 0xff);
  return s;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::string cur;
  for (char c : text) {
    if (c == '\n') {
      lines.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) lines.push_back(cur);
  return lines;
}

bool IsOneErrorLine(const std::string& err) {
  auto lines = Lines(err);
  return lines.size() == 1 && lines[0].rfind("qcow2dedup: ", 0) == 0 && !err.empty() && err.back() == '\n';
}

std::string FileDigest(const std::string& path) {
  std::string data = ReadBytes(path);
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : data) h = (h ^ c) * 1099511628211ull;
  return std::to_string(data.size()) + ":" + std::to_string(h);
}

}  // namespace testing::images
