#include "size.h"
#include "image_options.h"

#include <fmt/format.h>

#include <CLI/CLI.hpp>

#include <charconv>
#include <cstdint>
#include <string_view>

#include "output.h"
#include "qcow2dedup/share_limit.h"

namespace qcow2dedup::cli {
namespace {

Result<bool> ParseBool(const std::string& key, const std::string& v) {
  if (v == "on" || v == "yes" || v == "true") return true;
  if (v == "off" || v == "no" || v == "false") return false;
  return Status::InvalidArgument(fmt::format("parameter '{}' expects 'on' or 'off'", key));
}

// Options we accept only with the one value we write, so that a qemu-img
// command line asking for exactly that still works.
Status RequireValue(const std::string& key, const std::string& v, std::initializer_list<std::string_view> ok) {
  for (std::string_view o : ok)
    if (v == o) return Status::Ok();
  return Status::Unsupported(fmt::format("{}={} is not supported (qcow2dedup writes {}={})", key, v, key,
                                         *ok.begin()));
}

// A cap of 0 would index nothing (every cluster stored as if new): refused
// like qemu-img refuses a size it cannot use, naming the option.
Result<uint64_t> ParseIndexMemory(const std::string& value) {
  auto size = ParseSize(value);
  if (!size.ok() || *size == 0)
    return Status::InvalidArgument(
        fmt::format("parameter 'index_memory' expects a size of at least 1 byte (64M, 1G), not '{}'", value));
  return *size;
}

constexpr const char* kIndexMemoryHelp = "Memory the dedup index may take; past it data is stored, not indexed (qcow2dedup)";

// Calls f(key, value) for each key=value item of the -o arguments.
template <class F>
Status ForEachItem(const std::vector<std::string>& args, F f) {
  for (const std::string& arg : args) {
    size_t pos = 0;
    while (pos <= arg.size()) {
      size_t comma = arg.find(',', pos);
      if (comma == std::string::npos) comma = arg.size();
      const std::string item = arg.substr(pos, comma - pos);
      pos = comma + 1;
      if (item.empty()) continue;
      const size_t eq = item.find('=');
      if (eq == std::string::npos)
        return Status::InvalidArgument(fmt::format("parameter '{}' expects a value ({}=...)", item, item));
      QD_RETURN_IF_ERROR(f(item.substr(0, eq), item.substr(eq + 1)));
    }
  }
  return Status::Ok();
}

Status Apply(const std::string& key, const std::string& value, bool allow_verify, ImageOptions& out) {
  if (key == "index_memory" && allow_verify) {
    QD_ASSIGN_OR_RETURN(out.index_memory, ParseIndexMemory(value));
  } else if (key == "cluster_size") {
    auto size = ParseSize(value);
    if (!size.ok() || *size > UINT32_MAX)
      return Status::InvalidArgument(fmt::format("parameter 'cluster_size' expects a size, not '{}'", value));
    out.create.cluster_size = uint32_t(*size);
  } else if (key == "refcount_bits") {
    uint32_t bits = 0;
    auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), bits);
    if (ec != std::errc() || end != value.data() + value.size())
      return Status::InvalidArgument(fmt::format("parameter 'refcount_bits' expects a number, not '{}'", value));
    out.create.refcount_bits = bits;
  } else if (key == "lazy_refcounts") {
    QD_ASSIGN_OR_RETURN(out.create.lazy_refcounts, ParseBool(key, value));
  } else if (key == "verify" && allow_verify) {
    QD_ASSIGN_OR_RETURN(out.verify, ParseBool(key, value));
  } else if (key == "compat") {
    return RequireValue(key, value, {"1.1", "v3"});
  } else if (key == "extended_l2") {
    return RequireValue(key, value, {"off"});
  } else if (key == "compression_type") {
    if (value == "zlib") {
      out.create.compression_type = Compression::kZlib;
    } else if (value == "zstd") {
      out.create.compression_type = Compression::kZstd;
    } else {
      return Status::InvalidArgument(fmt::format("parameter 'compression_type' expects zlib or zstd, not '{}'", value));
    }
  } else {
    return Status::InvalidArgument(fmt::format("invalid parameter '{}'", key));
  }
  return Status::Ok();
}

}  // namespace

Status ParseImageOptions(const std::vector<std::string>& args, bool allow_verify, ImageOptions& out) {
  return ForEachItem(args, [&](const std::string& key, const std::string& value) {
    return Apply(key, value, allow_verify, out);
  });
}

Status ParseSessionOptions(const std::vector<std::string>& args, uint64_t& index_memory) {
  index_memory = 0;
  return ForEachItem(args, [&](const std::string& key, const std::string& value) -> Status {
    if (key != "index_memory") return Status::InvalidArgument(fmt::format("invalid parameter '{}'", key));
    QD_ASSIGN_OR_RETURN(index_memory, ParseIndexMemory(value));
    return Status::Ok();
  });
}

bool OnlySessionOptions(const std::vector<std::string>& args) {
  return ForEachItem(args, [](const std::string& key, const std::string&) {
           return key == "index_memory" ? Status::Ok() : Status::InvalidArgument(key);
         }).ok();
}

void PrintSessionOptionsHelp() {
  fmt::print("Supported options:\n");
  fmt::print("  {:<22} - {}\n", "index_memory=<size>", kIndexMemoryHelp);
  throw CLI::Success();
}

bool AsksForHelp(const std::string& arg) {
  size_t pos = 0;
  while (pos <= arg.size()) {
    const size_t comma = std::min(arg.find(',', pos), arg.size());
    const std::string item = arg.substr(pos, comma - pos);
    if (item == "help" || item == "?") return true;
    pos = comma + 1;
  }
  return false;
}

void PrintImageOptionsHelp(bool allow_verify) {
  // qemu-img's names, types and help texts; where we take only the one
  // value we write, the text says so.
  struct Line {
    const char* name;
    const char* help;
  };
  static const Line kLines[] = {
      {"cluster_size=<size>", "qcow2 cluster size"},
      {"compat=<str>", "Compatibility level (v3 [1.1] only)"},
      {"compression_type=<str>", "Compression method used for image cluster compression"},
      {"extended_l2=<bool (on/off)>", "Extended L2 tables (off only)"},
      {"lazy_refcounts=<bool (on/off)>", "Postpone refcount updates"},
      {"refcount_bits=<num>", "Width of a reference count entry in bits"},
  };
  fmt::print("Supported qcow2 options:\n");
  for (const Line& l : kLines) fmt::print("  {:<22} - {}\n", l.name, l.help);
  if (allow_verify) {
    fmt::print("  {:<22} - {}\n", "index_memory=<size>", kIndexMemoryHelp);
    fmt::print("  {:<22} - {}\n", "verify=<bool (on/off)>",
               "Compare bytes before sharing a cluster, not only hashes (qcow2dedup)");
  }
  throw CLI::Success();
}

void PrintRawOptionsHelp() {
  // qemu-img convert -O raw -o help, word for word (without a target name:
  // we take none of the file protocol's options).
  fmt::print("Supported raw options:\n");
  fmt::print("  {:<22} - {}\n", "size=<size>", "Virtual disk size");
  fmt::print("\nThe protocol level may support further options.\n"
             "Specify the target filename to include those options.\n");
  throw CLI::Success();
}

std::string FormattingLine(const std::string& path, const CreateOptions& o) {
  const std::string backing =
      o.backing_file.empty() ? "" : fmt::format("backing_file={} backing_fmt={} ", o.backing_file, o.backing_format);
  return fmt::format(
      "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2=off compression_type={} size={} "
      "{}lazy_refcounts={} refcount_bits={}",
      path, o.cluster_size, o.compression_type == Compression::kZstd ? "zstd" : "zlib", o.virtual_size, backing,
      o.lazy_refcounts ? "on" : "off", o.refcount_bits);
}

void WarnIfNoSharing(const std::string& path, const CreateOptions& o) {
  if (ShareLimit(o.refcount_bits) > 1) return;
  Warn(path, fmt::format("with refcount_bits={} no cluster is shared (sharing stops at half the largest refcount, "
                         "to leave room for a snapshot); use refcount_bits=4 or more to deduplicate",
                         o.refcount_bits));
}

}  // namespace qcow2dedup::cli
