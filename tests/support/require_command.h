// A judge (qemu-img, qemu-io, ...) that is missing fails the test case that
// needs it: a test that returned early would pass without testing anything.
#pragma once

#include <doctest/doctest.h>

#include <string>

#include "support/process.h"

namespace testing {

// The Debian package that holds a command the tests run (.ci/install-deps.sh
// installs them all).
inline std::string PackageOf(const std::string& command) {
  if (command.rfind("qemu-", 0) == 0) return "qemu-utils";
  return command;
}

inline void RequireCommand(const std::string& command) {
  REQUIRE_MESSAGE(HaveCommand(command), command, " is missing: install the ", PackageOf(command),
                  " package (.ci/install-deps.sh installs it)");
}

}  // namespace testing
