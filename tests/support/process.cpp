#include "support/process.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "support/temp_dir.h"

namespace testing {

static std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

RunResult Run(const std::string& cmd, const std::string& input) {
  TempDir tmp;
  std::string in = tmp.path() + "/in", out = tmp.path() + "/out", err = tmp.path() + "/err";
  std::ofstream(in, std::ios::binary) << input;
  std::string full = "( " + cmd + " ) <" + Sh(in) + " >" + Sh(out) + " 2>" + Sh(err);
  int status = std::system(full.c_str());
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return {code, Slurp(out), Slurp(err)};
}

std::string Sh(const std::string& word) {
  std::string q = "'";
  for (char c : word) {
    if (c == '\'') q += "'\\''";
    else q += c;
  }
  return q + "'";
}

std::string Tool() { return Sh(QCOW2DEDUP_BIN); }

bool HaveCommand(const std::string& name) {
  return Run("command -v " + Sh(name)).exit_code == 0;
}

}  // namespace testing
