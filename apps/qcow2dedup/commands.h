// The subcommands. Each registers its options on its CLI11 subcommand
// (Setup) and, once the command line parsed, does its work (Run, which
// returns the exit code). main.cpp lists them in one table.
#pragma once

#include <string>

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

// Helpers for Setup functions, so that every subcommand spells the shared
// options the same way.
void AddOutputOption(CLI::App& app, OutputFormat& out);
void AddForceShareOption(CLI::App& app, bool& force_share);
// -f raw|qcow2 (the format of an image we read).
void AddFormatOption(CLI::App& app, ImageFormat& format, const std::string& help);
// A size with suffixes (64K, 10G), checked while parsing.
CLI::Option* AddSizeOption(CLI::App& app, const std::string& name, uint64_t& size, const std::string& help);

}  // namespace qcow2dedup::cli
