// The subcommands. Each registers its options on its CLI11 subcommand
// (Setup) and, once the command line parsed, does its work (Run, which
// returns the exit code). main.cpp lists them in one table.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "output.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup::cli {

void SetupCreate(CLI::App& app);
int RunCreate();
void SetupInfo(CLI::App& app);
int RunInfo();
void SetupConvert(CLI::App& app);
int RunConvert();
void SetupWrite(CLI::App& app);
int RunWrite();
void SetupCheck(CLI::App& app);
int RunCheck();
void SetupDedupStats(CLI::App& app);
int RunDedupStats();
void SetupDedup(CLI::App& app);
int RunDedup();
void SetupServe(CLI::App& app);
int RunServe();

// False only for a readable file without qcow2's magic: such an error is
// then explained by the format rather than reported as a damaged image.
bool LooksLikeQcow2(const std::string& path);

// Helpers for Setup functions, so that every subcommand spells the shared
// options the same way.

// An option with a fixed set of values, each standing for a T.
template <class T>
CLI::Option* AddChoiceOption(CLI::App& app, const std::string& name, T& target,
                             std::vector<std::pair<std::string, T>> choices, const std::string& help) {
  std::vector<std::string> names;
  std::string text;
  for (auto& [n, v] : choices) {
    names.push_back(n);
    text += (text.empty() ? "" : "|") + n;
  }
  return app
      .add_option_function<std::string>(
          name,
          [&target, choices](const std::string& value) {
            for (auto& [n, v] : choices)
              if (n == value) target = v;
          },
          help)
      ->check(CLI::IsMember(names))
      ->option_text(text);
}

void AddOutputOption(CLI::App& app, OutputFormat& out);
void AddForceShareOption(CLI::App& app, bool& force_share);
// -t writeback|unsafe (when written data is synced, as qemu-img -t).
CLI::Option* AddCacheOption(CLI::App& app, CacheMode& cache);
// --flush-interval SIZE (write, convert): flush after every SIZE bytes of data.
CLI::Option* AddFlushIntervalOption(CLI::App& app, uint64_t& interval);
// -o OPTIONS for write, serve and dedup (index_memory=SIZE; -o help lists
// it): parsed by ParseSessionOptions in Run, so that a bad value names the image.
CLI::Option* AddSessionOptions(CLI::App& app, std::vector<std::string>& options);
// -f raw|qcow2 (the format of an image we read).
CLI::Option* AddFormatOption(CLI::App& app, ImageFormat& format, const std::string& help);
// A size with suffixes (64K, 10G), checked while parsing.
CLI::Option* AddSizeOption(CLI::App& app, const std::string& name, uint64_t& size, const std::string& help);

}  // namespace qcow2dedup::cli
