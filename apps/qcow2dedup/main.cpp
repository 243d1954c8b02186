// qcow2dedup: a qemu-img-like front end for the qcow2dedup library.
// The subcommands live in one table, in the manner of ninja's tools.
#include <fmt/format.h>

#include <cstdio>
#include <cstring>
#include <exception>

#include "commands.h"

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
};

int Main(int argc, char** argv) {
  CLI::App app{"qcow2dedup: write deduplicated qcow2 images", "qcow2dedup"};
  app.require_subcommand(1, 1);
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return fmt::format("qcow2dedup: {}\nRun with --help for more information.\n", e.what());
  });
  std::vector<std::pair<CLI::App*, const Command*>> subcommands;
  for (const Command& c : kCommands) {
    CLI::App* sub = app.add_subcommand(c.name, c.help);
    c.setup(*sub);
    subcommands.emplace_back(sub, &c);
  }
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

void AddOutputOption(CLI::App& app, OutputFormat& out) {
  app.add_option("--output", out, "Output format: human or json")
      ->transform(CLI::CheckedTransformer(
          std::map<std::string, OutputFormat>{{"human", OutputFormat::kHuman}, {"json", OutputFormat::kJson}}))
      ->option_text("human|json");
}

void AddForceShareOption(CLI::App& app, bool& force_share) {
  app.add_flag("-U,--force-share", force_share, "Read without QEMU's image lock (the image may be in use)");
}

void AddFormatOption(CLI::App& app, ImageFormat& format, const std::string& help) {
  app.add_option("-f", format, help)
      ->transform(CLI::CheckedTransformer(
          std::map<std::string, ImageFormat>{{"raw", ImageFormat::kRaw}, {"qcow2", ImageFormat::kQcow2}}))
      ->option_text("raw|qcow2");
}

CLI::Option* AddSizeOption(CLI::App& app, const std::string& name, uint64_t& size, const std::string& help) {
  return app
      .add_option_function<std::string>(
          name,
          [&size, name](const std::string& text) {
            auto r = ParseSize(text);
            if (!r.ok()) throw CLI::ValidationError(name, r.status().message());
            size = *r;
          },
          help)
      ->option_text("SIZE");
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
