// The base of an overlay: -b/-B and -F, checked before anything is created.
#include "backing.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include "output.h"

namespace qcow2dedup::cli {
namespace {

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa, sb;
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

}  // namespace

void AddBackingOptions(CLI::App& app, const std::string& flag, BackingArgs& args) {
  args.flag = app.add_option(flag, args.name,
                 "Make an overlay on this backing file (a relative name is relative to the new image's directory)")
      ->option_text("BASE");
  app.add_option("-F", args.format, "The backing file's format: raw or qcow2 (required with " + flag + ")")
      ->option_text("raw|qcow2");
}

std::unique_ptr<BlockDevice> OpenBase(const std::string& overlay, const BackingArgs& args) {
  if (args.flag->count() > 0 && args.name.empty()) {
    Fail(overlay, "Expected backing file name, got empty string");
    return nullptr;
  }
  if (args.name.empty()) {
    Fail(overlay, "Backing format cannot be used without backing file");
    return nullptr;
  }
  const std::string path = BackingPath(overlay, args.name);
  // With --force the image would replace its own base.
  if (SameFile(path, overlay)) {
    Fail(overlay, fmt::format("is its own backing file '{}'; make the overlay another file", path));
    return nullptr;
  }
  ImageFormat format = ImageFormat::kAuto;
  if (args.format == "raw") format = ImageFormat::kRaw;
  else if (args.format == "qcow2") format = ImageFormat::kQcow2;
  else if (!args.format.empty()) {
    Fail(overlay, fmt::format("backing file format '{}' is not supported (raw or qcow2)", args.format));
    return nullptr;
  }
  auto base = OpenBlockDevice(path, format);
  if (!base.ok()) {
    Fail(overlay, base.status().Prefixed(fmt::format("backing file '{}'", path)));
    return nullptr;
  }
  if (args.format.empty()) {
    // qemu-img 7.2 probes only to say what it found: the format must be given.
    Fail(overlay, fmt::format("Backing file specified without backing format (detected {}; give -F {})",
                              (*base)->format(), (*base)->format()));
    return nullptr;
  }
  return std::move(base).value();
}

}  // namespace qcow2dedup::cli
