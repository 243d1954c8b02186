// `qcow2dedup create` makes images stock QEMU accepts, reads and writes,
// refuses to replace a file unless told to, and turns every bad argument
// into one line on stderr.
#include <doctest/doctest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "support/process.h"
#include "support/qemu_images.h"
#include "support/temp_dir.h"

using namespace testing;
using namespace testing::images;

namespace {

constexpr uint64_t KiB = 1024, MiB = 1024 * 1024;
std::string N(uint64_t v) { return std::to_string(v); }

// qemu-img check must exit 0 and say so in words.
void CheckClean(const std::string& img) {
  RunResult r = Run("qemu-img check " + Sh(img));
  INFO("qemu-img check ", img, ":\n", r.out, r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("No errors were found on the image.") != std::string::npos);
}

// A failed command: non-zero exit (not a signal), one line on stderr.
void CheckCleanFailure(const RunResult& r, const std::string& cmd) {
  INFO("command: ", cmd);
  INFO("exit code: ", r.exit_code);
  INFO("stdout: ", r.out);
  INFO("stderr: ", r.err);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code < 128);
  CHECK(IsOneErrorLine(r.err));
}

}  // namespace

TEST_CASE("create: images QEMU accepts, at every cluster size, refcount width and lazy setting") {
  for (uint64_t cs : {uint64_t(512), 4 * KiB, 64 * KiB, 2 * MiB}) {
    for (int bits : {1, 16, 64}) {
      for (const char* lazy : {"off", "on"}) {
        std::string name = "cluster_size=" + N(cs) + " refcount_bits=" + N(bits) + " lazy_refcounts=" + lazy;
        SUBCASE(name.c_str()) {
          TempDir dir;
          const std::string img = dir / "img.qcow2";
          const uint64_t size = 16 * MiB;
          std::string opts = "cluster_size=" + N(cs) + ",refcount_bits=" + N(bits) + ",lazy_refcounts=" + lazy;
          MustRun(Tool() + " create -q -o " + Sh(opts) + " " + Sh(img) + " 16M");
          CheckClean(img);

          nlohmann::json q = QemuInfo(img);
          CHECK(q["virtual-size"] == size);
          CHECK(q["cluster-size"] == cs);
          CHECK(q["format"] == "qcow2");
          CHECK(q["format-specific"]["data"]["compat"] == "1.1");
          CHECK(q["format-specific"]["data"]["refcount-bits"] == bits);
          CHECK(q["format-specific"]["data"]["lazy-refcounts"] == (std::string(lazy) == "on"));
          CHECK(q["dirty-flag"] == false);
          nlohmann::json ours = OurInfo(img);
          CompareInfo(ours, q);
          CHECK(ours["dedup"]["present"] == true);

          // QEMU writes and reads it back, and the image stays clean.
          RunResult io = MustRun("qemu-io -f qcow2 -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' " + Sh(img));
          INFO("qemu-io: ", io.out);
          CHECK(io.out.find("read 65536/65536 bytes at offset 0") != std::string::npos);
          CHECK(io.out.find("failed") == std::string::npos);
          CHECK(io.out.find("mismatch") == std::string::npos);
          CheckClean(img);

          // Our extension survives QEMU's rewrite of the header.
          nlohmann::json after = OurInfo(img);
          CompareInfo(after, QemuInfo(img));
          CHECK(after["dedup"]["present"] == true);

          // And what QEMU wrote reads back through us.
          const std::string ref = dir / "ref.raw", out = dir / "out.raw";
          MustRun("qemu-img convert -O raw " + Sh(img) + " " + Sh(ref));
          MustRun(Tool() + " convert -O raw " + Sh(img) + " " + Sh(out));
          CHECK(Run("cmp " + Sh(ref) + " " + Sh(out)).exit_code == 0);
        }
      }
    }
  }
}

TEST_CASE("create: size arguments") {
  struct S {
    const char* arg;
    uint64_t bytes;
  };
  for (S s : {S{"512", 512}, S{"1536", 1536}, S{"64K", 64 * KiB}, S{"100M", 100 * MiB}, S{"1G", 1024 * MiB},
              S{"2T", 2ull << 40}}) {
    SUBCASE(s.arg) {
      TempDir dir;
      const std::string img = dir / "img.qcow2";
      MustRun(Tool() + " create -q " + Sh(img) + " " + s.arg);
      CheckClean(img);
      nlohmann::json q = QemuInfo(img);
      CHECK(q["virtual-size"] == s.bytes);
      CompareInfo(OurInfo(img), q);
    }
  }
}

TEST_CASE("create: output, like qemu-img's") {
  TempDir dir;
  RunResult quiet = MustRun(Tool() + " create -q " + Sh(dir / "q.qcow2") + " 1M");
  CHECK(quiet.out.empty());
  CHECK(quiet.err.empty());
  RunResult loud = MustRun(Tool() + " create " + Sh(dir / "l.qcow2") + " 1M");
  INFO("stdout: ", loud.out);
  CHECK(loud.out.rfind("Formatting '" + (dir / "l.qcow2") + "', fmt=qcow2", 0) == 0);
  CHECK(Lines(loud.out).size() == 1);
}

TEST_CASE("create: an existing file is replaced only with --force") {
  for (const char* kind : {"plain file", "qcow2 image"}) {
    SUBCASE(kind) {
      TempDir dir;
      const std::string img = dir / "img.qcow2";
      if (std::string(kind) == "plain file") {
        WriteBytes(img, "precious data, not an image\n");
      } else {
        MustRun("qemu-img create -q -f qcow2 " + Sh(img) + " 4M");
        MustRun("qemu-io -f qcow2 -c 'write -P 0x42 0 64k' " + Sh(img));
      }
      const std::string before = FileDigest(img);
      std::string cmd = Tool() + " create " + Sh(img) + " 1M";
      RunResult r = Run(cmd);
      CheckCleanFailure(r, cmd);
      CHECK(r.err.find(img) != std::string::npos);
      CHECK(FileDigest(img) == before);

      MustRun(Tool() + " create --force -q " + Sh(img) + " 1M");
      CheckClean(img);
      CHECK(QemuInfo(img)["virtual-size"] == 1 * MiB);
      // Nothing of the old file shows through.
      MustRun("qemu-io -f qcow2 -c 'read -P 0 0 1M' " + Sh(img));
    }
  }
}

TEST_CASE("create: bad arguments fail with one line and create nothing") {
  struct B {
    const char* what;
    std::string args;  // before FILE
    std::string size;  // after FILE
  };
  const std::vector<B> bad = {
      {"cluster_size=3000", "-o cluster_size=3000", "1M"},
      {"cluster_size=256", "-o cluster_size=256", "1M"},
      {"cluster_size=4M", "-o cluster_size=4M", "1M"},
      {"cluster_size=0", "-o cluster_size=0", "1M"},
      {"refcount_bits=3", "-o refcount_bits=3", "1M"},
      {"refcount_bits=128", "-o refcount_bits=128", "1M"},
      {"refcount_bits=0", "-o refcount_bits=0", "1M"},
      {"lazy_refcounts=maybe", "-o lazy_refcounts=maybe", "1M"},
      {"unknown -o key", "-o frobnicate=on", "1M"},
      {"unknown -o key after a good one", "-o cluster_size=4k,frobnicate=on", "1M"},
      {"size 12Q", "", "12Q"},
      {"size -5", "", "-5"},
      {"size empty", "", "''"},
      {"size 1.5.5G", "", "1.5.5G"},
      {"size beyond 2^64", "", "20000000000000000000"},
      {"size 16E", "", "16E"},
  };
  for (const B& b : bad) {
    SUBCASE(b.what) {
      TempDir dir;
      const std::string img = dir / "img.qcow2";
      std::string cmd = Tool() + " create " + b.args + " " + Sh(img) + " " + b.size;
      RunResult r = Run(cmd);
      CheckCleanFailure(r, cmd);
      CHECK_MESSAGE(!FileExists(img), "a failed create left ", img, " behind");
    }
  }
}
