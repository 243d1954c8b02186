#include "support/nbd_server.h"

#include <doctest/doctest.h>
#include <signal.h>

#include <nlohmann/json.hpp>

#include "support/process.h"
#include "support/qcow2_layout.h"

namespace testing {

namespace {
int servers = 0;  // each server its own socket and log, also in one directory
}

NbdServer::NbdServer(const std::string& dir, const std::string& image, const std::string& args)
    : socket_(dir + "/nbd" + std::to_string(++servers) + ".sock"),
      err_path_(dir + "/serve" + std::to_string(servers) + ".err"),
      uri_("nbd+unix:///?socket=" + socket_) {
  // exec: the process we signal is the server itself, not a shell.
  proc_ = std::make_unique<BackgroundProcess>("exec " + Tool() + " serve --socket " + Sh(socket_) + " " + args +
                                              " " + Sh(image) + " 2>" + Sh(err_path_));
}

std::string NbdServer::err() const { return ReadFileBytes(err_path_); }

bool NbdServer::WaitReady(double timeout_seconds) {
  bool ready = WaitFor([&] { return err().find("serving") != std::string::npos || !proc_->Running(); },
                       timeout_seconds);
  return ready && proc_->Running();
}

int NbdServer::Stop(double timeout_seconds) {
  if (proc_->Running()) ::kill(proc_->pid(), SIGTERM);
  return proc_->Wait(timeout_seconds);
}

void NbdServer::Kill9() { proc_->Kill(); }

uint64_t OracleUniqueClusters(const std::string& raw, uint64_t cluster_size) {
  RunResult r = Run("python3 " + Sh(QCOW2DEDUP_SOURCE_DIR "/../shared/oracle/dedup_oracle.py") + " " + Sh(raw) +
                    " " + std::to_string(cluster_size));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  return nlohmann::json::parse(r.out)["unique"].get<uint64_t>();
}

uint64_t StoredClusters(const std::string& image) {
  RunResult r = Run(Tool() + " info --output=json " + Sh(image));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  auto j = nlohmann::json::parse(r.out);
  REQUIRE(j["dedup"]["in-sync"].get<bool>());
  return j["dedup"]["stored-clusters"].get<uint64_t>();
}

}  // namespace testing
