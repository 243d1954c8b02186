// serve: exports an image over NBD by exec'ing nbdkit with our plugin
// (apps/nbdkit-plugin). nbdkit owns the protocol, connections and signals;
// the plugin opens the image (before anything is served, so that a bad image
// or one in use is an error line and a non-zero exit) and closes it cleanly
// when nbdkit stops.
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "commands.h"

namespace qcow2dedup::cli {
namespace {

struct {
  std::string image;
  bool readonly = false, progress = false;
  CacheMode cache = CacheMode::kWriteback;
  std::string socket, bind, run;
  int port = -1;
} opts;

constexpr const char* kPluginName = "nbdkit-qcow2dedup-plugin.so";
constexpr int kDefaultPort = 10809;  // NBD's port, qemu-nbd's default

namespace fs = std::filesystem;

// The plugin next to this binary (the build tree), else where cmake
// --install put it relative to the binary, else in nbdkit's plugindir.
std::string FindPlugin() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  std::vector<fs::path> candidates;
  if (!ec) {
    const fs::path dir = self.parent_path();
    candidates.push_back(dir / kPluginName);
    const fs::path installed = QCOW2DEDUP_PLUGIN_INSTALL_DIR;
    candidates.push_back(installed.is_absolute() ? installed / kPluginName : dir / ".." / installed / kPluginName);
  }
  candidates.push_back(fs::path(NBDKIT_PLUGINDIR) / kPluginName);
  for (const fs::path& p : candidates)
    if (fs::is_regular_file(p, ec)) return fs::weakly_canonical(p, ec).string();
  return "";
}

std::string Absolute(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::absolute(path, ec);
  return ec ? path : p.lexically_normal().string();
}

std::string ShellQuote(const std::string& word) {
  std::string q = "'";
  for (char c : word) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

}  // namespace

void SetupServe(CLI::App& app) {
  app.add_flag("-r,--read-only", opts.readonly, "Export read-only (the image is opened with QEMU's shared lock)");
  AddCacheOption(app, opts.cache);
  auto* socket = app.add_option("--socket", opts.socket, "Listen on this Unix socket")->option_text("PATH");
  auto* port = app.add_option("--port", opts.port, "Listen on this TCP port (default 10809 without --socket)")
                   ->check(CLI::Range(0, 65535))
                   ->option_text("N");
  auto* bind = app.add_option("--bind", opts.bind, "The address to listen on with --port (default 127.0.0.1)")
                   ->option_text("ADDR");
  socket->excludes(port);
  socket->excludes(bind);
  app.add_option("--run", opts.run,
                 "Serve while this shell command runs ($uri is the export's URI), then stop and exit with its status")
      ->option_text("COMMAND");
  app.add_flag("-p,--progress", opts.progress, "Show the progress of a dedup index rebuild on stderr");
  app.add_option("IMAGE", opts.image, "The image to serve")->required();
}

int RunServe() {
  const std::string plugin = FindPlugin();
  if (plugin.empty())
    return Fail("", fmt::format("cannot find {} (next to the qcow2dedup binary or in {})", kPluginName,
                                NBDKIT_PLUGINDIR));
  const std::string image = Absolute(opts.image);
  std::vector<std::string> args = {"nbdkit", "-f"};
  if (opts.readonly) args.push_back("-r");
  std::string uri;
  if (!opts.socket.empty()) {
    const std::string socket = Absolute(opts.socket);
    args.insert(args.end(), {"-U", socket});
    uri = "nbd+unix:///?socket=" + socket;
  } else if (opts.port >= 0 || !opts.bind.empty() || opts.run.empty()) {
    const int port = opts.port >= 0 ? opts.port : kDefaultPort;
    const std::string addr = opts.bind.empty() ? "127.0.0.1" : opts.bind;
    args.insert(args.end(), {"-p", std::to_string(port), "-i", addr});
    uri = fmt::format("nbd://{}:{}", addr.find(':') != std::string::npos ? "[" + addr + "]" : addr, port);
  } else {
    args.insert(args.end(), {"-U", "-"});  // private, for --run alone
  }
  if (!opts.run.empty()) {
    // nbdkit sets $uri in the command's shell; print it there, since a
    // private socket's name is known only to nbdkit.
    args.insert(args.end(),
                {"--run", fmt::format("printf 'qcow2dedup: serving %s at %s\\n' {} \"$uri\" >&2\n{}", ShellQuote(image), opts.run)});
  }
  args.push_back(plugin);
  args.push_back("file=" + image);
  if (opts.readonly) args.push_back("readonly=true");
  if (opts.cache == CacheMode::kUnsafe) args.push_back("unsafe=true");
  if (opts.progress) args.push_back("progress=true");
  if (opts.run.empty()) args.push_back("uri=" + uri);

  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(stdout);
  ::execvp("nbdkit", argv.data());
  return Fail("nbdkit", errno == ENOENT ? "not found: serve needs nbdkit (Debian's nbdkit package)"
                                        : std::string("cannot run it: ") + std::strerror(errno));
}

}  // namespace qcow2dedup::cli
