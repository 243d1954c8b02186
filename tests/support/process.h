// Runs a command line through /bin/sh and captures what it printed.
#pragma once

#include <string>
#include <vector>

namespace testing {

struct RunResult {
  int exit_code;
  std::string out;
  std::string err;
};

// Runs cmd (a shell command line) with stdin from /dev/null unless input is given.
RunResult Run(const std::string& cmd, const std::string& input = "");
// Quotes one word for the shell.
std::string Sh(const std::string& word);
// The built qcow2dedup binary, quoted.
std::string Tool();
bool HaveCommand(const std::string& name);

}  // namespace testing
