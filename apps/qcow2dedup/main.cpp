// qcow2dedup: a qemu-img-like front end for the qcow2dedup library.
// The subcommands live in one table, in the manner of ninja's tools.
#include <fcntl.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "qcow2dedup/image.h"
#include "qcow2dedup/version.h"
#include "size.h"
#include "commands.h"
#include "image_options.h"

namespace qcow2dedup::cli {
namespace {

struct Command {
  const char* name;
  const char* help;
  void (*setup)(CLI::App&);
  int (*run)();
};

constexpr Command kCommands[] = {
    {"create", "Create an empty deduplicating qcow2 image", SetupCreate, RunCreate},
    {"info", "Show what an image is: sizes, format details, dedup state", SetupInfo, RunInfo},
    {"convert", "Copy a raw or qcow2 image (or standard input) into a dedup image, or out to raw",
     SetupConvert, RunConvert},
    {"write", "Write a file, standard input or a byte pattern into an image", SetupWrite, RunWrite},
    {"check", "Check an image's consistency (and repair it with -r)", SetupCheck, RunCheck},
    {"dedup-stats", "Show what deduplication saves, or simulate it at other cluster sizes",
     SetupDedupStats, RunDedupStats},
    {"dedup", "Deduplicate an image in place and give the freed space back", SetupDedup, RunDedup},
    {"serve", "Export an image over NBD (through nbdkit); every write goes through inline dedup", SetupServe,
     RunServe},
};

// A closed standard descriptor would be handed to the next open(): an
// image would then be "standard input", or receive our printing.
void KeepStandardDescriptorsOpen() {
  for (int fd = 0; fd <= 2; ++fd)
    if (::fcntl(fd, F_GETFD) < 0 && errno == EBADF && ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY) < 0)
      std::abort();  // cannot even report it: stderr may be the one closed
}

int Main(int argc, char** argv) {
  KeepStandardDescriptorsOpen();
  // Images our sessions closed cleanly, and unchanged since, are opened
  // for writing without the full metadata pass (qcow2dedup/image.h).
  SetVettedStampsPath(DefaultVettedStampsPath());
  CLI::App app{"qcow2dedup: write deduplicated qcow2 images", "qcow2dedup"};
  app.require_subcommand(1, 1);
  // Listed in --help; the check before parsing (below) answers it.
  app.set_version_flag("-V,--version", std::string("qcow2dedup version ") + QCOW2DEDUP_VERSION,
                       "Print the version and exit");
  // One line, like every other failure (scripts and tests count on it).
  app.failure_message(
      [](const CLI::App*, const CLI::Error& e) { return fmt::format("qcow2dedup: {}\n", e.what()); });
  std::vector<std::pair<CLI::App*, const Command*>> subcommands;
  for (const Command& c : kCommands) {
    CLI::App* sub = app.add_subcommand(c.name, c.help);
    c.setup(*sub);
    subcommands.emplace_back(sub, &c);
  }
  // CLI11 would take an unknown name for a stray argument and ask for a
  // subcommand; say what is wrong instead (qemu-img: "Command not found").
  if (argc > 1 && argv[1][0] != '-' &&
      std::none_of(std::begin(kCommands), std::end(kCommands),
                   [&](const Command& c) { return std::strcmp(c.name, argv[1]) == 0; })) {
    return Fail("", fmt::format("unknown subcommand '{}' (see qcow2dedup --help)", argv[1]));
  }
  // qemu-img's two lines, whatever follows (qemu-img --version ignores it too).
  if (argc > 1 && (std::strcmp(argv[1], "-V") == 0 || std::strcmp(argv[1], "--version") == 0)) {
    fmt::print("qcow2dedup version {}\nCopyright (c) 2026 the qcow2dedup developers\n", QCOW2DEDUP_VERSION);
    return std::fflush(stdout) == 0 && !std::ferror(stdout) ? 0 : Fail("standard output", std::strerror(errno));
  }
  // Before the subcommand only --help and --version are options; CLI11 would again ask
  // for a subcommand. qemu-img: "unrecognized option '-x'".
  if (argc > 1 && argv[1][0] == '-' && std::strcmp(argv[1], "-h") != 0 && std::strcmp(argv[1], "--help") != 0)
    return Fail("", fmt::format("unrecognized option '{}' (see qcow2dedup --help)", argv[1]));
  int rc = 1;
  try {
    app.parse(argc, argv);
    // A run may still throw a ParseError for options that only make sense
    // together, before it does any work.
    for (auto& [sub, command] : subcommands)
      if (sub->parsed()) rc = command->run();
  } catch (const CLI::ParseError& e) {
    // Help is success; any bad option is qemu-img's exit code 1.
    return app.exit(e) == 0 ? 0 : 1;
  }
  // Output that never arrived (a full disk, a closed pipe) is a failure too.
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) return Fail("standard output", std::strerror(errno));
  return rc;
}

}  // namespace

// Whether QEMU's probe takes the file for qcow2 (qcow2_probe: the magic in
// 8 bytes or more, version 2 or above) or for its version 1, qcow
// (qcow_probe: 64 bytes or more), rather than for raw.
bool LooksLikeQcow2(const std::string& path) {
  auto f = OpenPosixFile(path, OpenMode::kReadOnly);
  std::array<uint8_t, 8> head{};
  auto size = f.ok() ? (*f)->Size() : Result<uint64_t>(f.status());
  if (!f.ok() || !size.ok() || !(*f)->ReadAt(0, head).ok()) return true;
  const uint32_t version = uint32_t(head[4]) << 24 | uint32_t(head[5]) << 16 | uint32_t(head[6]) << 8 | head[7];
  const bool magic = head[0] == 'Q' && head[1] == 'F' && head[2] == 'I' && head[3] == 0xfb;
  return magic && ((*size >= 8 && version >= 2) || (*size >= 64 && version == 1));
}

void AddOutputOption(CLI::App& app, OutputFormat& out) {
  AddChoiceOption(app, "--output", out, {{"human", OutputFormat::kHuman}, {"json", OutputFormat::kJson}},
                  "Output format: human or json");
}

void AddForceShareOption(CLI::App& app, bool& force_share) {
  app.add_flag("-U,--force-share", force_share, "Read without QEMU's image lock (the image may be in use)");
}

CLI::Option* AddCacheOption(CLI::App& app, CacheMode& cache) {
  return AddChoiceOption(app, "-t", cache, {{"writeback", CacheMode::kWriteback}, {"unsafe", CacheMode::kUnsafe}},
                         "Cache mode: writeback (default) syncs in crash-safe order; unsafe never syncs");
}

CLI::Option* AddFlushIntervalOption(CLI::App& app, uint64_t& interval) {
  return AddSizeOption(app, "--flush-interval", interval,
                       "Flush data and tables after every SIZE bytes written (default: only at the end)");
}

CLI::Option* AddSessionOptions(CLI::App& app, std::vector<std::string>& options) {
  return app.add_option("-o", options, "Options: index_memory=SIZE caps the dedup index's memory (-o help lists them)")
      ->option_text("OPTIONS")
      ->allow_extra_args(false)
      ->each([](const std::string& v) {
        if (AsksForHelp(v)) PrintSessionOptionsHelp();
      });
}

CLI::Option* AddFormatOption(CLI::App& app, ImageFormat& format, const std::string& help) {
  return AddChoiceOption(app, "-f", format, {{"raw", ImageFormat::kRaw}, {"qcow2", ImageFormat::kQcow2}}, help);
}

CLI::Option* AddSizeOption(CLI::App& app, const std::string& name, uint64_t& size, const std::string& help) {
  return app
      .add_option_function<std::string>(
          name,
          [&size, name](const std::string& text) {
            auto r = ParseSize(text);
            if (!r.ok()) throw CLI::ValidationError(name, r.status().message());
            if (*r > kMaxSize) throw CLI::ValidationError(name, fmt::format("size '{}' is too large", text));
            size = *r;
          },
          help)
      ->type_name("SIZE");
}

}  // namespace qcow2dedup::cli

int main(int argc, char** argv) {
  try {
    return qcow2dedup::cli::Main(argc, argv);
  } catch (const std::exception& e) {
    // Nothing should get here; if it does, one line rather than an abort.
    return qcow2dedup::cli::Fail("", e.what());
  }
}
