// serve: exports an image over NBD by exec'ing nbdkit with our plugin
// (apps/nbdkit-plugin). nbdkit owns the protocol, connections and signals;
// the plugin opens the image (before anything is served, so that a bad image
// or one in use is an error line and a non-zero exit) and closes it cleanly
// when nbdkit stops.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "commands.h"
#include "image_options.h"

namespace qcow2dedup::cli {
namespace {

struct {
  std::string image;
  bool readonly = false, progress = false;
  CacheMode cache = CacheMode::kWriteback;
  std::string socket, bind, run;
  int port = -1;
  std::vector<std::string> options;  // -o
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

// nbdkit reports a socket it cannot bind in a line (or two) of its own,
// without saying what to do: try the usual failures first, for one line
// naming the socket. A socket file left by a killed server is removed, as
// QEMU does, but only once nothing answers on it.
Status CheckUnixSocket(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) return Status::InvalidArgument("socket path too long");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) return Status::IOError(std::strerror(errno));
    const std::string dir = fs::path(path).parent_path().string();
    if (::access(dir.c_str(), W_OK) != 0)
      return Status::IOError(fmt::format("cannot create a socket in {}: {}", dir, std::strerror(errno)));
    return Status::Ok();
  }
  if (!S_ISSOCK(st.st_mode)) return Status::Exists("exists and is not a socket");
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::IOError(std::strerror(errno));
  const bool answers = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  const int err = errno;
  ::close(fd);
  if (answers) return Status::Busy("socket in use: another server listens on it");
  if (err != ECONNREFUSED) return Status::IOError(std::strerror(err));
  if (::unlink(path.c_str()) != 0) return Status::IOError(fmt::format("cannot remove a stale socket: {}", std::strerror(errno)));
  return Status::Ok();
}

Status CheckTcpPort(const std::string& address, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  if (int rc = ::getaddrinfo(address.c_str(), std::to_string(port).c_str(), &hints, &res); rc != 0)
    return Status::InvalidArgument(fmt::format("cannot resolve the address: {}", ::gai_strerror(rc)));
  Status status = Status::Ok();
  for (addrinfo* a = res; a && status.ok(); a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int on = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);  // as nbdkit binds
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0) status = Status::Busy(fmt::format("cannot listen: {}", std::strerror(errno)));
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return status;
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
  AddSessionOptions(app, opts.options);
  app.add_flag("-p,--progress", opts.progress, "Show the progress of a dedup index rebuild on stderr");
  app.add_option("IMAGE", opts.image, "The image to serve")->required();
}

int RunServe() {
  uint64_t index_memory = 0;
  if (Status st = ParseSessionOptions(opts.options, index_memory); !st.ok()) return Fail(opts.image, st);
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
    if (Status st = CheckUnixSocket(socket); !st.ok()) return Fail(socket, st);
    args.insert(args.end(), {"-U", socket});
    uri = "nbd+unix:///?socket=" + socket;
  } else if (opts.port >= 0 || !opts.bind.empty() || opts.run.empty()) {
    const int port = opts.port >= 0 ? opts.port : kDefaultPort;
    const std::string addr = opts.bind.empty() ? "127.0.0.1" : opts.bind;
    if (Status st = CheckTcpPort(addr, port); !st.ok()) return Fail(fmt::format("{} port {}", addr, port), st);
    args.insert(args.end(), {"-p", std::to_string(port), "-i", addr});
    uri = fmt::format("nbd://{}:{}", addr.find(':') != std::string::npos ? "[" + addr + "]" : addr, port);
  } else {
    args.insert(args.end(), {"-U", "-"});  // private, for --run alone
  }
  if (!opts.run.empty()) {
    // nbdkit sets $uri in the command's shell; print it there, since a
    // private socket's name is known only to nbdkit.
    args.insert(args.end(),
                {"--run", fmt::format("printf 'qcow2dedup: serving %s at %s\\n' {} \"$uri\" >&2\n{}", ShellQuote(opts.image), opts.run)});
  }
  args.push_back(plugin);
  args.push_back("file=" + image);
  args.push_back("name=" + DisplayName(opts.image));
  if (opts.readonly) args.push_back("readonly=true");
  if (opts.cache == CacheMode::kUnsafe) args.push_back("unsafe=true");
  if (opts.progress) args.push_back("progress=true");
  if (index_memory) args.push_back(fmt::format("index_memory={}", index_memory));
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
