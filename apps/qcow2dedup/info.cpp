// info: qemu-img info's output, field for field, plus our dedup state.
#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <ctime>

#include "commands.h"

namespace qcow2dedup::cli {
namespace {

struct {
  std::string file;
  OutputFormat output = OutputFormat::kHuman;
  ImageFormat format = ImageFormat::kAuto;
  bool force_share = false;
  bool backing_chain = false;
} opts;

// A raw file has no header to say how much of it is on disk: ask stat.
uint64_t ActualSize(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? uint64_t(st.st_blocks) * 512 : 0;
}

// qemu's bdrv_snapshot_dump, both the header and the rows.
void PrintSnapshots(const std::vector<SnapshotInfo>& snapshots) {
  fmt::print("Snapshot list:\n");
  fmt::print("{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
  for (const SnapshotInfo& sn : snapshots) {
    const time_t t = time_t(sn.date_sec);
    struct tm tm {};
    localtime_r(&t, &tm);  // qemu prints local time
    char date[32];
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
    const uint64_t secs = sn.vm_clock_nsec / 1000000000;
    const std::string clock = fmt::format("{:02}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60,
                                          sn.vm_clock_nsec / 1000000 % 1000);
    const std::string icount = sn.icount == ~0ull ? "" : std::to_string(sn.icount);
    fmt::print("{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}\n", sn.id, sn.name, HumanSize(sn.vm_state_size), date, clock,
               icount);
  }
}

// qemu-img's human "bitmaps:" block: each bitmap's flags, name, granularity.
void PrintBitmaps(const std::vector<BitmapInfo>& bitmaps) {
  fmt::print("    bitmaps:\n");
  for (size_t n = 0; n < bitmaps.size(); ++n) {
    const BitmapInfo& b = bitmaps[n];
    fmt::print("        [{}]:\n            flags:\n", n);
    int f = 0;
    if (b.in_use) fmt::print("                [{}]: in-use\n", f++);
    if (b.auto_enabled) fmt::print("                [{}]: auto\n", f++);
    fmt::print("            name: {}\n            granularity: {}\n", b.name, b.granularity);
  }
}

void PrintHuman(const ImageInfo& i, const std::vector<BitmapInfo>& bitmaps, const std::string& format, bool qcow2) {
  fmt::print("image: {}\nfile format: {}\nvirtual size: {}\ndisk size: {}\n", i.filename, format,
             SizeWithBytes(i.virtual_size), HumanSize(i.actual_size));
  if (!qcow2) return;
  fmt::print("cluster_size: {}\n", i.cluster_size);
  if (i.dirty) fmt::print("cleanly shut down: no\n");
  if (!i.backing_file.empty()) {
    fmt::print("backing file: {}", i.backing_file);
    if (i.full_backing_file.empty())
      fmt::print(" (cannot determine actual path)");
    else if (i.full_backing_file != i.backing_file)
      fmt::print(" (actual path: {})", i.full_backing_file);
    fmt::print("\n");
    if (!i.backing_format.empty()) fmt::print("backing file format: {}\n", i.backing_format);
  }
  if (!i.snapshots.empty()) PrintSnapshots(i.snapshots);
  fmt::print("Format specific information:\n");
  fmt::print("    compat: {}\n", i.version >= 3 ? "1.1" : "0.10");
  fmt::print("    compression type: {}\n", i.compression_type);
  if (i.version >= 3) fmt::print("    lazy refcounts: {}\n", i.lazy_refcounts);
  if (!bitmaps.empty()) PrintBitmaps(bitmaps);
  fmt::print("    refcount bits: {}\n", i.refcount_bits);
  if (i.version >= 3) fmt::print("    corrupt: {}\n    extended l2: {}\n", i.corrupt, i.extended_l2);
  fmt::print("Dedup:\n    present: {}\n", i.dedup.present);
  if (!i.dedup.present) return;
  fmt::print("    in sync: {}\n", i.dedup.in_sync);
  if (!i.dedup.hash_algorithm.empty()) fmt::print("    hash algorithm: {}\n", i.dedup.hash_algorithm);
  if (i.dedup.stored_clusters) fmt::print("    stored clusters: {}\n", *i.dedup.stored_clusters);
}

Json SnapshotJson(const SnapshotInfo& sn) {
  Json j;
  j["id"] = sn.id;
  j["name"] = sn.name;
  j["vm-state-size"] = sn.vm_state_size;
  j["date-sec"] = sn.date_sec;
  j["date-nsec"] = sn.date_nsec;
  j["vm-clock-sec"] = sn.vm_clock_nsec / 1000000000;
  j["vm-clock-nsec"] = sn.vm_clock_nsec % 1000000000;
  if (sn.icount != ~0ull) j["icount"] = sn.icount;
  return QemuOrder(j);
}

// Keys in QAPI's ImageInfo order; QemuOrder then gives qemu-img's order.
Json BitmapJson(const BitmapInfo& b) {
  Json j;
  j["name"] = b.name;
  j["granularity"] = b.granularity;
  Json flags = Json::array();
  if (b.in_use) flags.push_back("in-use");
  if (b.auto_enabled) flags.push_back("auto");
  j["flags"] = flags;
  return QemuOrder(j);
}

Json InfoJson(const ImageInfo& i, const std::vector<BitmapInfo>& bitmaps, const std::string& format, bool qcow2) {
  Json j;
  j["filename"] = i.filename;
  j["format"] = format;
  j["dirty-flag"] = i.dirty;
  j["actual-size"] = i.actual_size;
  j["virtual-size"] = i.virtual_size;
  if (qcow2) j["cluster-size"] = i.cluster_size;
  if (!i.backing_file.empty()) {
    j["backing-filename"] = i.backing_file;
    if (!i.full_backing_file.empty()) j["full-backing-filename"] = i.full_backing_file;
    if (!i.backing_format.empty()) j["backing-filename-format"] = i.backing_format;
  }
  if (!i.snapshots.empty()) {
    Json list = Json::array();
    for (const SnapshotInfo& sn : i.snapshots) list.push_back(SnapshotJson(sn));
    j["snapshots"] = list;
  }
  if (qcow2) {
    Json data;
    data["compat"] = i.version >= 3 ? "1.1" : "0.10";
    if (i.version >= 3) {
      data["extended-l2"] = i.extended_l2;
      data["lazy-refcounts"] = i.lazy_refcounts;
      data["corrupt"] = i.corrupt;
    }
    data["refcount-bits"] = i.refcount_bits;
    if (!bitmaps.empty()) {
      Json list = Json::array();
      for (const BitmapInfo& b : bitmaps) list.push_back(BitmapJson(b));
      data["bitmaps"] = list;
    }
    data["compression-type"] = i.compression_type;
    Json specific;
    specific["type"] = "qcow2";
    specific["data"] = QemuOrder(data);
    j["format-specific"] = QemuOrder(specific);
  }
  j = QemuOrder(j);
  if (qcow2) {  // ours goes last, after everything qemu-img prints
    Json d;
    d["present"] = i.dedup.present;
    d["in-sync"] = i.dedup.in_sync;
    if (!i.dedup.hash_algorithm.empty()) d["hash-algorithm"] = i.dedup.hash_algorithm;
    if (i.dedup.stored_clusters) d["stored-clusters"] = *i.dedup.stored_clusters;
    j["dedup"] = d;
  }
  return j;
}

}  // namespace

void SetupInfo(CLI::App& app) {
  AddOutputOption(app, opts.output);
  AddForceShareOption(app, opts.force_share);
  AddFormatOption(app, opts.format, "Image format (default: probe)");
  app.add_flag("--backing-chain", opts.backing_chain, "Show every image of the backing chain, top first");
  app.add_option("FILE", opts.file, "The image")->required();
}

namespace {

// One image of the chain: what info prints of it, and where its backing file is.
struct Link {
  ImageInfo info;
  std::vector<BitmapInfo> bitmaps;
  std::string format;
  bool qcow2 = false;
};

Result<Link> Describe(const std::string& path, ImageFormat format) {
  QD_ASSIGN_OR_RETURN(auto dev, OpenBlockDevice(path, format, opts.force_share));
  Link link;
  const auto* image = dynamic_cast<const Image*>(dev.get());
  if (image) {
    link.info = image->Info();
    QD_ASSIGN_OR_RETURN(link.bitmaps, image->Bitmaps());
  } else {
    link.info.filename = path;
    link.info.virtual_size = dev->virtual_size();
    link.info.actual_size = ActualSize(path);
  }
  link.format = dev->format();
  link.qcow2 = image != nullptr;
  return link;
}

}  // namespace

int RunInfo() {
  // qemu-img's collect_image_info_list: the top image, then each backing
  // file by its resolved name and stored format, refusing a loop.
  std::vector<Link> chain;
  std::vector<std::string> seen;
  std::string path = opts.file;
  ImageFormat format = opts.format;
  for (;;) {
    if (std::find(seen.begin(), seen.end(), path) != seen.end())
      return Fail("", fmt::format("Backing file '{}' creates an infinite loop.", path));
    seen.push_back(path);
    auto link = Describe(path, format);
    if (!link.ok()) return Fail(path, link.status());
    chain.push_back(std::move(link).value());
    const ImageInfo& i = chain.back().info;
    if (!opts.backing_chain || i.backing_file.empty()) break;
    if (i.full_backing_file.empty()) return Fail(path, fmt::format("cannot determine the path of backing file '{}'", i.backing_file));
    path = i.full_backing_file;
    format = i.backing_format == "raw" ? ImageFormat::kRaw
             : i.backing_format == "qcow2" ? ImageFormat::kQcow2 : ImageFormat::kAuto;
  }
  if (opts.output == OutputFormat::kJson) {
    if (!opts.backing_chain) {
      PrintJson(InfoJson(chain[0].info, chain[0].bitmaps, chain[0].format, chain[0].qcow2));
    } else {
      Json list = Json::array();
      for (const Link& l : chain) list.push_back(InfoJson(l.info, l.bitmaps, l.format, l.qcow2));
      PrintJson(list);
    }
  } else {
    for (size_t n = 0; n < chain.size(); ++n) {
      if (n) fmt::print("\n");
      PrintHuman(chain[n].info, chain[n].bitmaps, chain[n].format, chain[n].qcow2);
    }
  }
  return 0;
}

}  // namespace qcow2dedup::cli
