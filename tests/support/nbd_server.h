// `qcow2dedup serve` running in the background for a test, on a Unix socket
// in the test's directory, with its stderr kept in a file.
#pragma once

#include <memory>
#include <string>

#include "support/qemu_tools.h"

namespace testing {

class NbdServer {
 public:
  // Starts `qcow2dedup serve --socket DIR/nbd.sock ARGS IMAGE`.
  NbdServer(const std::string& dir, const std::string& image, const std::string& args = "");
  // True once the server printed that it serves (its socket is bound), false
  // if it exited or took more than timeout_seconds.
  bool WaitReady(double timeout_seconds = 60);
  const std::string& uri() const { return uri_; }
  const std::string& socket() const { return socket_; }
  std::string err() const;  // what it printed on stderr so far
  // SIGTERM, then its exit code (-1 if it did not exit in time).
  int Stop(double timeout_seconds = 60);
  void Kill9();
  bool Running() { return proc_->Running(); }

 private:
  std::string socket_, err_path_, uri_;
  std::unique_ptr<BackgroundProcess> proc_;
};

// One line of JSON per cluster size from shared/oracle/dedup_oracle.py:
// the distinct non-zero clusters of a raw disk (what optimal dedup stores).
uint64_t OracleUniqueClusters(const std::string& raw, uint64_t cluster_size);
// stored-clusters of `qcow2dedup info --output=json` (REQUIREs an in-sync index).
uint64_t StoredClusters(const std::string& image);

}  // namespace testing
