// create: an empty dedup image, announced the way qemu-img create does.
#include <fmt/format.h>

#include "backing.h"
#include "commands.h"
#include "image_options.h"
#include "size.h"

namespace qcow2dedup::cli {
namespace {

struct {
  std::string file;
  std::string size;
  std::vector<std::string> options;
  std::string format = "qcow2";
  bool force = false;
  bool quiet = false;
  BackingArgs backing;  // -b, -F
} opts;

}  // namespace

void SetupCreate(CLI::App& app) {
  app.add_option("-f", opts.format, "Image format (only qcow2)")->check(CLI::IsMember({"qcow2"}));
  app.add_option("-o", opts.options,
                 "Options: cluster_size=SIZE, refcount_bits=N, lazy_refcounts=on|off (comma-separated; "
                 "-o help lists them)")
      ->option_text("OPTIONS")
      ->allow_extra_args(false)
      ->each([](const std::string& v) {
        if (AsksForHelp(v)) PrintImageOptionsHelp(/*allow_verify=*/false);
      });
  AddBackingOptions(app, "-b", opts.backing);
  app.add_flag("--force", opts.force, "Replace FILE if it exists");
  app.add_flag("-q,--quiet", opts.quiet, "Print nothing on success");
  app.add_option("FILE", opts.file, "The image to create")->required();
  // Checked in RunCreate, so that a bad size gets qemu-img's words.
  app.add_option("SIZE", opts.size,
                 "Virtual size: 1G, 1.5G, 512; suffixes K M G T P E (powers of 1024); with -b, the base's by default");
}

int RunCreate() {
  ImageOptions o;
  if (Status s = ParseImageOptions(opts.options, /*allow_verify=*/false, o); !s.ok()) return Fail(opts.file, s);
  // The base is checked before anything is made, so that a bad one leaves no file.
  std::unique_ptr<BlockDevice> base;
  if (opts.backing.given() && !(base = OpenBase(opts.file, opts.backing))) return 1;
  if (opts.size.empty() && !base) return Fail(opts.file, "Image creation needs a size parameter");
  if (!opts.size.empty()) {
    auto size = ParseSizeInRange("image size", opts.size, 0, kMaxSize);
    if (!size.ok()) return Fail("", size.status());
    o.create.virtual_size = *size;
  } else {
    o.create.virtual_size = (base->virtual_size() + 511) / 512 * 512;
  }
  base.reset();  // Create opens it again, as the overlay's backing file
  o.create.backing_file = opts.backing.name;
  o.create.backing_format = opts.backing.format;
  o.create.force = opts.force;
  auto image = Image::Create(opts.file, o.create);
  if (!image.ok()) return Fail(opts.file, image.status());
  WarnIfNoSharing(opts.file, o.create);  // a valid width, now that the image is made
  if (Status s = (*image)->Close(); !s.ok()) return Fail(opts.file, s);
  // Only once the image exists: unlike qemu-img, a failed create announces nothing.
  if (!opts.quiet) fmt::print("{}\n", FormattingLine(opts.file, o.create));
  return 0;
}

}  // namespace qcow2dedup::cli
