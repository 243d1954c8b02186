// `qcow2dedup serve` with real NBD clients as judges: qemu-io, qemu-img
// (convert to and from the export, map), nbdinfo and nbdcopy from libnbd,
// and libnbd itself on several connections at once. After each session the
// image must pass `qemu-img check`, hold the expected guest bytes (qemu-img
// compare against a model) and store no more clusters than optimal dedup.
#include <doctest/doctest.h>

#include <libnbd.h>
#include <signal.h>
#include <sys/stat.h>

#include <barrier>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "support/nbd_server.h"
#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/qemu_tools.h"
#include "support/temp_dir.h"

using namespace testing;

namespace {

constexpr uint64_t kCluster = 65536;

void RequireJudges() {
  for (const char* tool : {"nbdkit", "qemu-io", "qemu-img", "nbdinfo", "nbdcopy"}) {
    INFO("missing judge: " << tool);
    REQUIRE(HaveCommand(tool));
  }
}

void Create(const std::string& image, const std::string& size, const std::string& opts = "") {
  RunResult r = Run(Tool() + " create " + opts + " " + Sh(image) + " " + size);
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

RunResult MustRun(const std::string& cmd) {
  RunResult r = Run(cmd);
  INFO(cmd << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  return r;
}

// A stopped session's image: clean for qemu-img, the expected bytes, the
// dedup index in sync and marked clean, no more clusters than optimal.
void CheckSession(const std::string& image, const std::string& expected_raw) {
  CheckQemuClean(image);
  CheckQemuIdentical(image, expected_raw);
  RunResult r = MustRun(Tool() + " info --output=json " + Sh(image));
  auto j = nlohmann::json::parse(r.out);
  CHECK_FALSE(j["dirty-flag"].get<bool>());
  CHECK(j["dedup"]["in-sync"].get<bool>());
  CHECK(StoredClusters(image) <= OracleUniqueClusters(expected_raw, kCluster));
}


std::string QemuIo(const std::string& target, const std::string& cmds, const std::string& flags = "") {
  return "qemu-io -f raw --discard=unmap " + flags + " " + Sh(target) + " " + cmds;
}

}  // namespace

TEST_CASE("qemu-io writes, zeroes and discards through the export") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2", model = dir / "model.raw";
  Create(image, "16M");
  MustRun("truncate -s 16M " + Sh(model));
  // Duplicates (the same pattern at several places), partial clusters,
  // overwrites of shared clusters, zeroes with and without may-trim, discards.
  const std::string cmds =
      "-c 'write -P 0xab 0 1M' -c 'write -P 0xab 1M 1M' -c 'write -P 0xab 3M 192K' "
      "-c 'write -P 0xcd 100 1000' -c 'write -P 0x11 65000 2000' -c 'write -P 0x22 5M 4K' "
      "-c 'write -z 2M 512K' -c 'write -z -u 1M 300K' -c 'discard 640K 128K' -c 'discard 5M 64K' "
      "-c 'write -P 0x33 16770000 7216'";
  {
    NbdServer server(dir.path(), image);
    REQUIRE_MESSAGE(server.WaitReady(), server.err());
    CHECK(server.err().find("serving " + image + " at " + server.uri()) != std::string::npos);
    MustRun(QemuIo(server.uri(), cmds));
    MustRun(QemuIo(model, cmds));
    // Reads through the export agree with the model while it is served.
    RunResult r = MustRun(QemuIo(server.uri(), "-c 'read -P 0xab 128K 64K' -c 'read -P 0 2M 512K' -c 'read -P 0x11 65000 2000'"));
    CHECK(r.out.find("Pattern verification failed") == std::string::npos);
    REQUIRE(server.Stop() == 0);
  }
  CheckSession(image, model);
}

TEST_CASE("a discard drops references: refcounts and stored clusters fall") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2", model = dir / "model.raw";
  Create(image, "8M");
  // The same 2 MiB at 0 and at 4M: shared, every cluster with refcount 2.
  MustRun("head -c 2M /dev/urandom >" + Sh(dir / "a") + " && cat " + Sh(dir / "a") + " >" + Sh(model) +
          " && truncate -s 4M " + Sh(model) + " && cat " + Sh(dir / "a") + " >>" + Sh(model) + " && truncate -s 8M " +
          Sh(model));
  MustRun(Tool() + " write -q --input " + Sh(model) + " " + Sh(image) + " 0");
  const uint64_t before = StoredClusters(image);
  CHECK(before == 32);
  auto refcounts = [&] {
    auto j = nlohmann::json::parse(MustRun(Tool() + " dedup-stats --output=json " + Sh(image)).out);
    std::vector<uint64_t> max;  // the non-empty buckets of the histogram, by highest refcount
    for (auto& b : j["histogram"])
      if (b["stored-clusters"].get<uint64_t>() > 0) max.push_back(b["refcount-max"].get<uint64_t>());
    return max;
  };
  CHECK(refcounts() == std::vector<uint64_t>{2});
  {
    NbdServer server(dir.path(), image);
    REQUIRE_MESSAGE(server.WaitReady(), server.err());
    // One copy gone: nothing freed yet. Half the other: 16 clusters freed.
    MustRun(QemuIo(server.uri(), "-c 'discard 0 2M' -c 'discard 4M 1M'"));
    MustRun(QemuIo(model, "-c 'discard 0 2M' -c 'discard 4M 1M'"));
    REQUIRE(server.Stop() == 0);
  }
  CheckSession(image, model);
  CHECK(StoredClusters(image) == 16);
  auto stats = nlohmann::json::parse(MustRun(Tool() + " dedup-stats --output=json " + Sh(image)).out);
  CHECK(stats["data-clusters"].get<uint64_t>() == 16);
  CHECK(refcounts() == std::vector<uint64_t>{1});
  // TODO(hole punching, being added in the writer): assert that du shrinks.
}

TEST_CASE("qemu-img convert to and from the export; map and nbdinfo --map see the holes") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2", src = dir / "src.raw", out = dir / "out.raw";
  Create(image, "32M");
  // 1M random, 1M hole, the same 1M again, a hole to the end.
  MustRun("head -c 1M /dev/urandom >" + Sh(dir / "a") + " && cat " + Sh(dir / "a") + " >" + Sh(src) +
          " && truncate -s 2M " + Sh(src) + " && cat " + Sh(dir / "a") + " >>" + Sh(src) + " && truncate -s 32M " +
          Sh(src));
  {
    NbdServer server(dir.path(), image);
    REQUIRE_MESSAGE(server.WaitReady(), server.err());
    MustRun("qemu-img convert -n -f raw -O raw " + Sh(src) + " " + Sh(server.uri()));
    MustRun("qemu-img convert -f raw -O raw " + Sh(server.uri()) + " " + Sh(out));
    MustRun("cmp " + Sh(src) + " " + Sh(out));
    RunResult map = MustRun("qemu-img map -f raw --output=json " + Sh(server.uri()));
    auto j = nlohmann::json::parse(map.out);
    // Data exactly where the source has it.
    std::vector<std::pair<uint64_t, uint64_t>> data;
    for (auto& e : j)
      if (e["data"].get<bool>()) data.emplace_back(e["start"].get<uint64_t>(), e["length"].get<uint64_t>());
    CHECK(data == std::vector<std::pair<uint64_t, uint64_t>>{{0, 1 << 20}, {2 << 20, 1 << 20}});
    RunResult info = MustRun("nbdinfo --map " + Sh(server.uri()));
    CHECK(info.out.find("hole,zero") != std::string::npos);
    RunResult can = MustRun("nbdinfo --json " + Sh(server.uri()));
    auto cj = nlohmann::json::parse(can.out);
    CHECK(cj["exports"][0]["can_multi_conn"].get<bool>());
    CHECK(cj["exports"][0]["can_fua"].get<bool>());
    CHECK(cj["exports"][0]["can_fast_zero"].get<bool>());
    REQUIRE(server.Stop() == 0);
  }
  CheckSession(image, src);
  CHECK(StoredClusters(image) == 16);
}

TEST_CASE("nbdcopy to and from the export on four connections") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2", src = dir / "src.raw", out = dir / "out.raw";
  Create(image, "24M");
  // Two copies of 4M, then 4M of fresh data.
  MustRun("head -c 4M /dev/urandom >" + Sh(dir / "a") + " && cat " + Sh(dir / "a") + " " + Sh(dir / "a") + " >" +
          Sh(src) + " && head -c 4M /dev/urandom >>" + Sh(src) + " && truncate -s 24M " + Sh(src));
  {
    NbdServer server(dir.path(), image);
    REQUIRE_MESSAGE(server.WaitReady(), server.err());
    RunResult r = MustRun("nbdcopy --connections=4 --flush " + Sh(src) + " " + Sh(server.uri()));
    MustRun("nbdcopy " + Sh(server.uri()) + " " + Sh(out));
    MustRun("cmp " + Sh(src) + " " + Sh(out));
    REQUIRE(server.Stop() == 0);
    // The session's own count, printed at close.
    CHECK(server.err().find("128 stored, 64 shared") != std::string::npos);
  }
  CheckSession(image, src);
  CHECK(StoredClusters(image) == 128);
  // dedup-stats counts what the session stored: 192 data clusters in 128.
  auto stats = nlohmann::json::parse(MustRun(Tool() + " dedup-stats --output=json " + Sh(image)).out);
  CHECK(stats["data-clusters"].get<uint64_t>() == 192);
  CHECK(stats["stored-clusters"].get<uint64_t>() == 128);
}

namespace {

// What one request put where: the model of the concurrent test.
struct Op {
  uint64_t offset, length;
  std::string bytes;  // empty: zeroes (write-zeroes or trim)
};

}  // namespace

TEST_CASE("several connections write overlapping ranges and duplicate data at once") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2";
  constexpr uint64_t kSize = 4 << 20, kSector = 512;
  constexpr int kConnections = 4, kOps = 120;
  Create(image, "4M");
  std::mt19937_64 rng(20261201);
  // Four 64K blocks that every connection writes at many places: duplicates.
  std::vector<std::string> pool(4, std::string(kCluster, '\0'));
  for (auto& b : pool)
    for (auto& c : b) c = char(rng());
  std::vector<std::vector<Op>> ops(kConnections);
  for (int c = 0; c < kConnections; ++c)
    for (int i = 0; i < kOps; ++i) {
      const int kind = int(rng() % 10);
      Op op;
      if (kind < 5) {  // pooled whole clusters
        const uint64_t n = 1 + rng() % 3;
        op.offset = rng() % (kSize / kCluster - n + 1) * kCluster;
        op.length = n * kCluster;
        for (uint64_t k = 0; k < n; ++k) op.bytes += pool[rng() % pool.size()];
      } else if (kind < 8) {  // fresh data at any sector, any length
        op.length = (1 + rng() % 256) * kSector;
        op.offset = rng() % ((kSize - op.length) / kSector + 1) * kSector;
        op.bytes.resize(op.length);
        for (auto& ch : op.bytes) ch = char(rng());
      } else {  // zeroes or a trim
        op.length = (1 + rng() % 384) * kSector;
        op.offset = rng() % ((kSize - op.length) / kSector + 1) * kSector;
      }
      ops[c].push_back(std::move(op));
    }
  NbdServer server(dir.path(), image);
  REQUIRE_MESSAGE(server.WaitReady(), server.err());
  std::barrier start(kConnections);
  std::vector<std::string> errors(kConnections);
  std::vector<std::thread> threads;
  for (int c = 0; c < kConnections; ++c)
    threads.emplace_back([&, c] {
      nbd_handle* h = nbd_create();
      if (!h || nbd_connect_uri(h, server.uri().c_str()) != 0) {
        errors[c] = nbd_get_error() ? nbd_get_error() : "connect failed";
        start.arrive_and_drop();
        return;
      }
      if (nbd_can_multi_conn(h) != 1) errors[c] = "multi-conn not advertised";
      start.arrive_and_wait();
      std::mt19937 kind(c);
      for (const Op& op : ops[c]) {
        int rc;
        if (!op.bytes.empty())
          rc = nbd_pwrite(h, op.bytes.data(), op.bytes.size(), op.offset, kind() % 4 == 0 ? LIBNBD_CMD_FLAG_FUA : 0);
        else if (kind() % 2)
          rc = nbd_zero(h, op.length, op.offset, kind() % 2 ? LIBNBD_CMD_FLAG_NO_HOLE : 0);
        else
          rc = nbd_trim(h, op.length, op.offset, 0);
        if (rc != 0 && errors[c].empty()) errors[c] = nbd_get_error();
      }
      if (nbd_flush(h, 0) != 0 && errors[c].empty()) errors[c] = nbd_get_error();
      nbd_shutdown(h, 0);
      nbd_close(h);
    });
  for (auto& t : threads) t.join();
  for (int c = 0; c < kConnections; ++c) CHECK_MESSAGE(errors[c].empty(), "connection ", c, ": ", errors[c]);
  // Read what the server now shows, over NBD.
  std::string served(kSize, '\0');
  {
    nbd_handle* h = nbd_create();
    REQUIRE(nbd_connect_uri(h, server.uri().c_str()) == 0);
    for (uint64_t at = 0; at < kSize; at += 1 << 20) REQUIRE(nbd_pread(h, served.data() + at, 1 << 20, at, 0) == 0);
    nbd_shutdown(h, 0);
    nbd_close(h);
  }
  REQUIRE(server.Stop() == 0);
  // Each connection's requests ran in order, the connections' requests in
  // any interleaving: every sector holds what the last request of one of the
  // connections that touched it put there, or zeros if none did.
  int bad = 0;
  for (uint64_t s = 0; s < kSize; s += kSector) {
    std::vector<std::string> allowed;
    for (int c = 0; c < kConnections; ++c)
      for (auto it = ops[c].rbegin(); it != ops[c].rend(); ++it)
        if (it->offset <= s && s < it->offset + it->length) {
          allowed.push_back(it->bytes.empty() ? std::string(kSector, '\0') : it->bytes.substr(s - it->offset, kSector));
          break;
        }
    if (allowed.empty()) allowed.push_back(std::string(kSector, '\0'));
    const std::string got = served.substr(s, kSector);
    bool ok = false;
    for (auto& a : allowed) ok = ok || a == got;
    if (!ok && ++bad <= 5) FAIL_CHECK("sector at " << s << " holds bytes no connection's last request wrote");
  }
  CHECK(bad == 0);
  std::ofstream(dir / "served.raw", std::ios::binary) << served;
  CheckSession(image, dir / "served.raw");
  MESSAGE("concurrent: " << kConnections << " connections x " << kOps << " requests; stored clusters "
                         << StoredClusters(image) << ", optimal " << OracleUniqueClusters(dir / "served.raw", kCluster));
}

TEST_CASE("a read-only export: reads work, writes are refused, the image is untouched, others may read") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2", src = dir / "src.raw";
  Create(image, "4M");
  MustRun("head -c 1M /dev/urandom >" + Sh(src) + " && truncate -s 4M " + Sh(src));
  MustRun(Tool() + " write -q --input " + Sh(src) + " " + Sh(image) + " 0");
  const std::string before = ReadFileBytes(image);
  {
    NbdServer server(dir.path(), image, "-r");
    REQUIRE_MESSAGE(server.WaitReady(), server.err());
    MustRun("qemu-img convert -f raw -O raw " + Sh(server.uri()) + " " + Sh(dir / "out.raw"));
    MustRun("cmp " + Sh(src) + " " + Sh(dir / "out.raw"));
    RunResult w = Run(QemuIo(server.uri(), "-c 'write -P 1 0 64K'"));
    CHECK((w.exit_code != 0 || w.err.find("ermission denied") != std::string::npos ||
           w.out.find("ermission denied") != std::string::npos || w.err.find("read-only") != std::string::npos ||
           w.out.find("read-only") != std::string::npos));
    // A shared lock: another reader may open it, a writer may not.
    MustRun("qemu-io -r -f qcow2 " + Sh(image) + " -c 'read 0 64K'");
    CHECK(Run("qemu-io -f qcow2 " + Sh(image) + " -c 'write 0 64K'").exit_code != 0);
    REQUIRE(server.Stop() == 0);
  }
  CHECK(ReadFileBytes(image) == before);
}

TEST_CASE("locks: QEMU cannot open a served image, and serve refuses an image in use") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2";
  Create(image, "4M");
  {
    NbdServer server(dir.path(), image);
    REQUIRE_MESSAGE(server.WaitReady(), server.err());
    CHECK(HoldsQemuLock(image));
    RunResult r = Run("qemu-io -f qcow2 " + Sh(image) + " -c 'read 0 512'");
    CHECK(r.exit_code != 0);
    CHECK(r.err.find("lock") != std::string::npos);
    // A second server on the same image is refused before serving.
    RunResult second = Run(Tool() + " serve --socket " + Sh(dir / "other.sock") + " " + Sh(image));
    CHECK(second.exit_code != 0);
    CHECK(LineCount(second.err) == 1);
    CHECK(second.err.find(image) != std::string::npos);
    CHECK(second.err.find("in use") != std::string::npos);
    struct stat st;
    CHECK(::stat((dir / "other.sock").c_str(), &st) != 0);
    REQUIRE(server.Stop() == 0);
  }
  // qemu-io waits for commands on its standard input, open as long as sleep runs.
  BackgroundProcess holder("sleep 300 | qemu-io -f qcow2 " + Sh(image) + " >" + Sh(dir / "holder.log") + " 2>&1");
  // qemu-io takes its locks as it opens: wait until a writer is refused.
  // Wait by looking, not by trying: a probe that takes the lock could make qemu-io fail to open.
  const bool held = WaitFor([&] { return HoldsQemuLock(image); }, 20);
  INFO(ReadFileBytes(dir / "holder.log"));
  REQUIRE(held);
  RunResult r = Run(Tool() + " serve --socket " + Sh(dir / "s.sock") + " " + Sh(image));
  CHECK(r.exit_code != 0);
  CHECK(LineCount(r.err) == 1);
  CHECK(r.err.find(image) != std::string::npos);
}

TEST_CASE("bad input: one line naming the file, non-zero, nothing served") {
  RequireJudges();
  TempDir dir;
  MustRun("head -c 1M /dev/zero >" + Sh(dir / "plain.raw"));
  for (const std::string& path : {dir / "plain.raw", dir / "missing.qcow2"}) {
    RunResult r = Run(Tool() + " serve --socket " + Sh(dir / "s.sock") + " " + Sh(path));
    INFO(r.err);
    CHECK(r.exit_code != 0);
    CHECK(LineCount(r.err) == 1);
    CHECK(r.err.find(path) != std::string::npos);
  }
  // Sockets that cannot be listened on: one line naming the socket, and the
  // image untouched (they are refused before it is opened).
  Create(dir / "img.qcow2", "1M");
  Create(dir / "other.qcow2", "1M");
  MustRun("touch " + Sh(dir / "regular"));
  NbdServer busy(dir.path(), dir / "other.qcow2");
  REQUIRE_MESSAGE(busy.WaitReady(), busy.err());
  for (const std::string& socket : {dir / "no/such/dir/s.sock", dir / "regular", busy.socket()}) {
    RunResult r = Run(Tool() + " serve --socket " + Sh(socket) + " " + Sh(dir / "img.qcow2"));
    INFO(r.err);
    CHECK(r.exit_code != 0);
    CHECK(LineCount(r.err) == 1);
    CHECK(r.err.find(socket) != std::string::npos);
  }
  CHECK(busy.Stop() == 0);
  // A port in use.
  BackgroundProcess listener("exec nbdkit -f -p 10938 -i 127.0.0.1 null 1M");
  REQUIRE(WaitFor([] { return Run("nbdinfo --size nbd://127.0.0.1:10938").exit_code == 0; }, 20));
  RunResult r = Run(Tool() + " serve --port 10938 " + Sh(dir / "img.qcow2"));
  INFO(r.err);
  CHECK(r.exit_code != 0);
  CHECK(LineCount(r.err) == 1);
  CHECK(r.err.find("10938") != std::string::npos);
  CheckQemuClean(dir / "img.qcow2");
}

TEST_CASE("a socket left by a killed server is reused") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2";
  Create(image, "1M");
  NbdServer killed(dir.path(), image);
  REQUIRE_MESSAGE(killed.WaitReady(), killed.err());
  killed.Kill9();
  struct stat st;
  REQUIRE(::stat(killed.socket().c_str(), &st) == 0);  // still there
  RunResult r = Run(Tool() + " serve --socket " + Sh(killed.socket()) + " --run 'nbdinfo --size \"$uri\"' " + Sh(image));
  INFO(r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out == "1048576\n");
  CheckQemuClean(image);
}

TEST_CASE("--run serves while the command runs and exits with its status") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2", src = dir / "src.raw";
  Create(image, "4M");
  MustRun("head -c 512K /dev/urandom >" + Sh(src) + " && truncate -s 4M " + Sh(src));
  RunResult r = Run(Tool() + " serve --run 'qemu-img convert -n -f raw -O raw " + src + " \"$uri\"' " + Sh(image));
  INFO(r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.err.find("serving " + image + " at nbd+unix://") != std::string::npos);
  CheckSession(image, src);
  r = Run(Tool() + " serve -r --run 'exit 7' " + Sh(image));
  CHECK(r.exit_code == 7);
}

TEST_CASE("kill -9 after FUA writes and a flush: they survive, check -r all repairs the rest") {
  RequireJudges();
  TempDir dir;
  const std::string image = dir / "img.qcow2", model = dir / "model.raw";
  Create(image, "16M");
  MustRun("truncate -s 16M " + Sh(model));
  const std::string durable = "-c 'write -P 0x5a 0 1M' -c 'write -P 0x5a 1M 1M' -c 'write -P 0x6b 3M 100K'";
  const std::string flushed = "-c 'write -P 0x7c 6M 512K' -c 'write -P 0x5a 8M 64K' -c flush";
  NbdServer server(dir.path(), image);
  REQUIRE_MESSAGE(server.WaitReady(), server.err());
  // qemu-io's default cache mode is writethrough: every write carries FUA.
  MustRun(QemuIo(server.uri(), durable));
  MustRun(QemuIo(server.uri(), flushed, "-t writeback"));
  MustRun(QemuIo(model, durable));
  MustRun(QemuIo(model, flushed));
  // Then writes that were neither: they may or may not survive.
  MustRun(QemuIo(server.uri(), "-c 'write -P 0x01 12M 2M'", "-t writeback"));
  server.Kill9();
  RunResult check = MustRun(Tool() + " check -r all " + Sh(image));
  CheckQemuClean(image);
  // Everything but the unflushed range must read back as the model.
  MustRun("qemu-img convert -f qcow2 -O raw " + Sh(image) + " " + Sh(dir / "got.raw"));
  MustRun("cmp -n 12M " + Sh(dir / "got.raw") + " " + Sh(model));
  // And the image serves again.
  NbdServer again(dir.path(), image);
  REQUIRE_MESSAGE(again.WaitReady(), again.err());
  MustRun(QemuIo(again.uri(), "-c 'read -P 0x5a 0 2M' -c 'read -P 0x6b 3M 100K'"));
  // Killed again after a FUA write; this time serve opens the dirty image
  // itself, which repairs it first as QEMU would.
  MustRun(QemuIo(again.uri(), "-c 'write -P 0x5a 10M 1M'"));
  MustRun(QemuIo(model, "-c 'write -P 0x5a 10M 1M'"));
  again.Kill9();
  NbdServer third(dir.path(), image);
  REQUIRE_MESSAGE(third.WaitReady(), third.err());
  MustRun(QemuIo(third.uri(), "-c 'read -P 0x5a 10M 1M' -c 'read -P 0x7c 6M 512K'"));
  REQUIRE(third.Stop() == 0);
  CheckQemuClean(image);
  MustRun("qemu-img convert -f qcow2 -O raw " + Sh(image) + " " + Sh(dir / "got.raw"));
  MustRun("cmp -n 12M " + Sh(dir / "got.raw") + " " + Sh(model));
}

namespace {

// The server's system calls (strace -f) while qemu-io runs cmds: for each
// reply to a request (NBD's simple reply: writes, flushes, zeroes), whether
// the image was synced after the last write to it before the reply went out.
std::vector<bool> SyncedBeforeReplies(const TempDir& dir, const std::string& image, const std::string& cmds,
                                      const std::string& qemu_io_flags) {
  const std::string log = dir / "strace.log";
  MustRun("strace -f -qq -o " + Sh(log) + " -e trace=pwrite64,pwritev,write,fdatasync,fsync,sendto,sendmsg " +
          Tool() + " serve --run " + Sh("qemu-io -f raw " + qemu_io_flags + " \"$uri\" " + cmds) + " " + Sh(image));
  std::istringstream lines(ReadFileBytes(log));
  std::vector<bool> synced;
  bool dirty = false;  // a write to the image since the last sync
  for (std::string line; std::getline(lines, line);) {
    if (line.find("pwrite") != std::string::npos) dirty = true;
    if (line.find("fdatasync(") != std::string::npos || line.find("fsync(") != std::string::npos) dirty = false;
    if (line.find("sendto(") != std::string::npos && line.find("\"gDf\\230") != std::string::npos)
      synced.push_back(!dirty);
  }
  return synced;
}

}  // namespace

TEST_CASE("FUA writes and flushes are on disk before their reply (strace)") {
  RequireJudges();
  REQUIRE(HaveCommand("strace"));
  TempDir dir;
  const std::string image = dir / "img.qcow2";
  Create(image, "8M");
  // qemu-io's default, writethrough, sets FUA on every write.
  auto fua = SyncedBeforeReplies(dir, image, "-c 'write -P 1 0 64K' -c 'write -P 2 1M 4K' -c 'write -P 3 100 200'", "");
  REQUIRE(fua.size() >= 3);  // and qemu-io flushes as it closes
  for (size_t i = 0; i < fua.size(); ++i) CHECK_MESSAGE(fua[i], "FUA write ", i, " answered before a sync");
  // Writeback: no FUA; the flush's reply must follow a sync.
  auto flushed = SyncedBeforeReplies(dir, image, "-c 'write -P 4 2M 64K' -c 'write -P 5 100 200' -c flush", "-t writeback");
  REQUIRE(flushed.size() >= 3);
  CHECK(flushed[2]);
  CheckQemuClean(image);
}
