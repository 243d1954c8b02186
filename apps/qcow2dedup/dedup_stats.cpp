// dedup-stats: what deduplication saved in an image, or (--simulate) what
// optimal dedup would store at other cluster sizes, of one image or of a
// fleet of them (alone, together, as overlays on --base).
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>

#include "size.h"
#include "commands.h"
#include "progress.h"
#include "qcow2dedup/stats.h"

namespace qcow2dedup::cli {
namespace {

struct {
  std::vector<std::string> files;
  std::string base;  // --base
  OutputFormat output = OutputFormat::kHuman;
  bool force_share = false, simulate = false, progress = false;
  bool compress = false;                           // -c
  Compression compression = Compression::kZlib;  // -o compression_type=
  ImageFormat format = ImageFormat::kAuto;
  std::vector<uint64_t> cluster_sizes = {4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20};
} opts;

// Ratios rounded so that the JSON is the same on every machine and readable.
double Round(double v, int digits) {
  const double scale = std::pow(10.0, digits);
  return std::round(v * scale) / scale;
}

std::string Hex(uint64_t v) { return fmt::format("{:#x}", v); }

std::string RefcountRange(const HistogramBucket& b) {
  return b.refcount_min == b.refcount_max ? std::to_string(b.refcount_min)
                                          : fmt::format("{}-{}", b.refcount_min, b.refcount_max);
}

Json StatsJson(const DedupStats& s) {
  Json j;
  j["filename"] = s.filename;
  j["virtual-size"] = s.virtual_size;
  j["cluster-size"] = s.cluster_size;
  j["guest-clusters"] = s.guest_clusters;
  j["data-clusters"] = s.data_clusters;
  j["zero-clusters"] = s.zero_clusters;
  if (s.backing_clusters) j["backing-clusters"] = s.backing_clusters;  // as qemu-img: only when there are any
  j["stored-clusters"] = s.stored_clusters;
  j["dedup-ratio"] = Round(s.dedup_ratio, 4);
  j["compressed-clusters"] = s.compressed_clusters;
  j["stored-bytes"] = s.stored_bytes;
  j["compress-ratio"] = Round(s.compress_ratio, 4);
  j["copies"] = 1;
  j["dedup-compress-ratio"] = Round(s.total_ratio, 4);
  j["saved-bytes"] = s.saved_bytes;
  j["saving-percent"] = Round(s.saving_percent, 2);
  j["reclaimable-clusters"] = s.reclaimable_clusters;
  j["reclaimable-bytes"] = s.reclaimable_clusters * s.cluster_size;
  j["memory-misses"] = s.memory_misses;
  j["metadata-bytes"] = {{"l1", s.metadata.l1},
                         {"l2", s.metadata.l2},
                         {"refcount", s.metadata.refcount},
                         {"index", s.metadata.index},
                         {"total", s.metadata.total()}};
  Json histogram = Json::array();
  for (const HistogramBucket& b : s.histogram)
    histogram.push_back({{"refcount-min", b.refcount_min},
                         {"refcount-max", b.refcount_max},
                         {"stored-clusters", b.stored_clusters},
                         {"references", b.references}});
  j["histogram"] = histogram;
  Json top = Json::array();
  for (const SharedCluster& c : s.top)
    top.push_back({{"host-offset", c.host_offset}, {"refcount", c.refcount}, {"guest-offsets", c.guest_offsets}});
  j["top"] = top;
  return j;
}

void PrintStats(const DedupStats& s) {
  const uint64_t cs = s.cluster_size;
  std::vector<std::vector<std::string>> rows = {
      {"image:", s.filename},
      {"virtual size:", SizeWithBytes(s.virtual_size)},
      {"cluster size:", SizeWithBytes(cs)},
      {"guest clusters:", std::to_string(s.guest_clusters)},
      {"  with data:", fmt::format("{} ({})", s.data_clusters, HumanSize(s.data_clusters * cs))},
      {"  reading as zero:", std::to_string(s.zero_clusters)},
  };
  if (s.backing_clusters) rows.push_back({"  from the backing file:", std::to_string(s.backing_clusters)});
  rows.insert(rows.end(), {
      {"stored clusters:", fmt::format("{} ({})", s.stored_clusters, HumanSize(s.stored_clusters * cs))},
  });
  if (s.compressed_clusters)
    rows.push_back({"  compressed:", fmt::format("{}, in {}", s.compressed_clusters, HumanSize(s.stored_bytes -
                                                  (s.stored_clusters - s.compressed_clusters) * cs))});
  rows.insert(rows.end(), {
      {"dedup ratio:", fmt::format("{:.2f}", s.dedup_ratio)},
      {"compress ratio:", fmt::format("{:.2f}", s.compress_ratio)},
      // zdb -DD's summary; qcow2 keeps one copy of each cluster.
      {"dedup * compress:", fmt::format("{:.2f} (dedup = {:.2f}, compress = {:.2f}, copies = 1.00)", s.total_ratio,
                                        s.dedup_ratio, s.compress_ratio)},
      {"saved:", fmt::format("{}, {:.2f}% of the data", SizeWithBytes(s.saved_bytes), s.saving_percent)},
      {"dedup would reclaim:", s.reclaimable_clusters
                                   ? fmt::format("{} cluster{}, {}; run 'qcow2dedup dedup'", s.reclaimable_clusters,
                                                 s.reclaimable_clusters == 1 ? "" : "s",
                                                 SizeWithBytes(s.reclaimable_clusters * cs))
                                   : std::string("nothing")},
      {"index memory misses:",
       s.memory_misses ? fmt::format("{} (duplicates stored for lack of index memory, at most)", s.memory_misses)
                       : std::string("0")},
      {"metadata:", SizeWithBytes(s.metadata.total())},
      {"  L1 table:", SizeWithBytes(s.metadata.l1)},
      {"  L2 tables:", SizeWithBytes(s.metadata.l2)},
      {"  refcounts:", SizeWithBytes(s.metadata.refcount)},
      {"  dedup index:", SizeWithBytes(s.metadata.index)},
  });
  PrintTable(rows, 0);
  if (!s.histogram.empty()) {
    fmt::print("\nRefcount histogram:\n");
    rows = {{"refcount", "stored clusters", "references"}};
    for (const HistogramBucket& b : s.histogram)
      rows.push_back({RefcountRange(b), std::to_string(b.stored_clusters), std::to_string(b.references)});
    PrintTable(rows, 0b111, "  ");
  }
  if (!s.top.empty()) {
    fmt::print("\nMost shared clusters:\n");
    rows = {{"host offset", "refcount", "guest offsets"}};
    for (const SharedCluster& c : s.top) {
      std::string guests;
      for (uint64_t g : c.guest_offsets) guests += (guests.empty() ? "" : " ") + Hex(g);
      if (c.guest_offsets.size() < c.refcount) guests += " ...";
      rows.push_back({Hex(c.host_offset), std::to_string(c.refcount), guests});
    }
    PrintTable(rows, 0b011, "  ");
  }
}

// The smallest estimated image; on a tie qemu's default 64 KiB, then the
// larger cluster (less metadata to keep).
const Simulation& Recommended(const std::vector<Simulation>& sims, bool compressed) {
  auto key = [compressed](const Simulation& s) {
    return std::tuple(compressed ? s.estimated_compressed_image_size : s.estimated_image_size,
                      s.cluster_size != 65536, ~s.cluster_size);
  };
  return *std::min_element(sims.begin(), sims.end(),
                           [&](const Simulation& a, const Simulation& b) { return key(a) < key(b); });
}

Json SimulationJson(const Simulation& s) {
  return {{"cluster-size", s.cluster_size},
          {"clusters", s.clusters},
          {"nonzero", s.nonzero},
          {"unique", s.unique},
          {"ratio", Round(s.ratio, 4)},
          {"estimated-image-size", s.estimated_image_size}};
}

// An image's simulation in a fleet's: its name first, the size said once.
Json Named(const std::string& name, const Simulation& s) {
  Json j = {{"filename", name}};
  const Json all = SimulationJson(s);
  for (auto it = all.begin(); it != all.end(); ++it)
    if (it.key() != "cluster-size") j[it.key()] = it.value();
  return j;
}

std::string Clusters(uint64_t n, uint64_t cs) {
  return fmt::format("{} cluster{}, {}", n, n == 1 ? "" : "s", HumanSize(n * cs));
}

struct Opened {
  std::string name;
  std::unique_ptr<BlockDevice> dev;
};

Json DeviceJson(const Opened& o) {
  return Json{{"filename", o.name}, {"format", o.dev->format()}, {"virtual-size", o.dev->virtual_size()}};
}

void PrintFleetJson(const std::vector<Opened>& images, const Opened* base, const std::vector<FleetSimulation>& fleet) {
  Json j;
  j["images"] = Json::array();
  for (const Opened& o : images) j["images"].push_back(DeviceJson(o));
  if (base) j["base"] = DeviceJson(*base);
  Json list = Json::array();
  for (const FleetSimulation& f : fleet) {
    Json sim = {{"cluster-size", f.cluster_size}, {"images", Json::array()}};
    for (size_t i = 0; i < images.size(); ++i) {
      Json one = Named(images[i].name, f.alone[i]);
      if (base) {
        const OverlaySimulation& o = f.overlays[i];
        one["overlay"] = {
            {"differing", o.differing}, {"unique", o.unique}, {"estimated-image-size", o.estimated_image_size}};
      }
      sim["images"].push_back(one);
    }
    sim["alone-unique"] = f.alone_unique;
    sim["together-nonzero"] = f.together_nonzero;
    sim["together-unique"] = f.together_unique;
    sim["together-ratio"] = Round(f.together_ratio, 4);
    if (base) {
      sim["base"] = Named(base->name, *f.base);
      sim["overlays-unique"] = f.overlays_unique;
      sim["base-and-overlays-unique"] = f.base->unique + f.overlays_unique;
    }
    list.push_back(sim);
  }
  j["simulations"] = list;
  PrintJson(j);
}

void PrintFleet(const std::vector<Opened>& images, const Opened* base, const std::vector<FleetSimulation>& fleet) {
  std::vector<std::vector<std::string>> rows = {{"image", "file format", "virtual size"}};
  for (const Opened& o : images) rows.push_back({o.name, o.dev->format(), HumanSize(o.dev->virtual_size())});
  if (base) rows.push_back({base->name + " (base)", base->dev->format(), HumanSize(base->dev->virtual_size())});
  PrintTable(rows, 0b100);
  for (const FleetSimulation& f : fleet) {
    const uint64_t cs = f.cluster_size;
    fmt::print("\nAt {} clusters (counts of clusters):\n", HumanSize(cs));
    rows = {{"image", "non-zero", "alone"}};
    if (base) rows[0].insert(rows[0].end(), {"differing from base", "overlay"});
    for (size_t i = 0; i < images.size(); ++i) {
      rows.push_back({images[i].name, std::to_string(f.alone[i].nonzero), std::to_string(f.alone[i].unique)});
      if (base)
        rows.back().insert(rows.back().end(),
                           {std::to_string(f.overlays[i].differing), std::to_string(f.overlays[i].unique)});
    }
    if (base)
      rows.push_back({base->name + " (base)", std::to_string(f.base->nonzero), std::to_string(f.base->unique), "", ""});
    PrintTable(rows, 0b11110, "  ");
    rows = {{"each image alone stores:", Clusters(f.alone_unique, cs)},
            {"all in one dedup image:",
             Clusters(f.together_unique, cs) + fmt::format(" (ratio {:.2f})", f.together_ratio)}};
    if (base)
      rows.push_back({"the base and overlays:", Clusters(f.base->unique + f.overlays_unique, cs) +
                                                    fmt::format(" ({} + {})", f.base->unique, f.overlays_unique)});
    fmt::print("\n");
    PrintTable(rows, 0, "  ");
  }
}

// Every input is opened before anything is read: a bad one fails at once.
int RunFleet() {
  std::vector<Opened> images;
  for (const std::string& f : opts.files) {
    auto dev = OpenBlockDevice(f, opts.format, opts.force_share);
    if (!dev.ok()) return Fail(f, dev.status());
    images.push_back({f, std::move(dev).value()});
  }
  std::optional<Opened> base;
  if (!opts.base.empty()) {
    auto dev = OpenBlockDevice(opts.base, opts.format, opts.force_share);
    if (!dev.ok()) return Fail(opts.base, dev.status());
    base = Opened{opts.base, std::move(dev).value()};
  }
  std::vector<FleetImage> devs;
  for (Opened& o : images) devs.push_back({o.name, o.dev.get()});
  std::optional<FleetImage> base_dev;
  if (base) base_dev = FleetImage{base->name, base->dev.get()};
  Progress progress(opts.progress);
  // Its errors name the image.
  auto fleet = SimulateFleet(devs, base_dev, opts.cluster_sizes, progress.fn());
  if (!fleet.ok()) return Fail("", fleet.status());
  progress.Finish();
  if (opts.output == OutputFormat::kJson)
    PrintFleetJson(images, base ? &*base : nullptr, *fleet);
  else
    PrintFleet(images, base ? &*base : nullptr, *fleet);
  return 0;
}

int RunSimulate() {
  if (opts.files.size() > 1 || !opts.base.empty()) return RunFleet();
  const std::string& file = opts.files[0];
  auto dev = OpenBlockDevice(file, opts.format, opts.force_share);
  if (!dev.ok()) return Fail(file, dev.status());
  Progress progress(opts.progress);
  auto sims = SimulateDedup(**dev, opts.cluster_sizes, progress.fn(),
                            opts.compress ? std::optional<Compression>(opts.compression) : std::nullopt);
  if (!sims.ok()) return Fail(file, sims.status());
  progress.Finish();
  if (opts.output == OutputFormat::kJson) {
    Json list = Json::array();
    for (const Simulation& s : *sims) {
      Json j = SimulationJson(s);
      if (opts.compress) {
        j["compression-type"] = opts.compression == Compression::kZstd ? "zstd" : "zlib";
        j["compressible"] = s.compressible;
        j["compressed-bytes"] = s.compressed_bytes;
        j["estimated-compressed-image-size"] = s.estimated_compressed_image_size;
      }
      list.push_back(j);
    }
    PrintJson(Json{{"filename", file}, {"simulations", list}});
    return 0;
  }
  fmt::print("image: {}\nfile format: {}\nvirtual size: {}\n\n", file, (*dev)->format(),
             SizeWithBytes((*dev)->virtual_size()));
  std::vector<std::vector<std::string>> rows = {
      {"cluster size", "clusters", "non-zero", "unique", "ratio", "estimated image size"}};
  if (opts.compress) rows[0].push_back(opts.compression == Compression::kZstd ? "with -c (zstd)" : "with -c (zlib)");
  for (const Simulation& s : *sims) {
    rows.push_back({HumanSize(s.cluster_size), std::to_string(s.clusters), std::to_string(s.nonzero),
                    std::to_string(s.unique), fmt::format("{:.2f}", s.ratio), HumanSize(s.estimated_image_size)});
    if (opts.compress) rows.back().push_back(HumanSize(s.estimated_compressed_image_size));
  }
  PrintTable(rows, opts.compress ? 0b1111111 : 0b111111);
  if (!sims->empty())
    fmt::print("\nRecommended cluster size: {} (smallest estimated image{})\n",
               HumanSize(Recommended(*sims, opts.compress).cluster_size), opts.compress ? " with -c" : "");
  return 0;
}

std::vector<uint64_t> ParseClusterSizes(const std::string& text) {
  std::vector<uint64_t> sizes;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    pos = comma + 1;
    auto size = ParseSize(item);
    if (!size.ok()) throw CLI::ValidationError("--cluster-sizes", size.status().message());
    if (!std::has_single_bit(*size) || *size < 512 || *size > (2u << 20))
      throw CLI::ValidationError("--cluster-sizes",
                                 fmt::format("'{}' is not a power of two between 512 and 2M", item));
    sizes.push_back(*size);
  }
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return sizes;
}

}  // namespace

void SetupDedupStats(CLI::App& app) {
  AddOutputOption(app, opts.output);
  AddForceShareOption(app, opts.force_share);
  auto* simulate = app.add_flag("--simulate", opts.simulate,
                                "Read any image (raw too) and estimate what optimal dedup stores at each cluster size");
  auto* sizes = app.add_option_function<std::string>(
                       "--cluster-sizes", [](const std::string& t) { opts.cluster_sizes = ParseClusterSizes(t); },
                       "With --simulate: the cluster sizes to try (default 4K,16K,64K,256K,1M)")
                    ->option_text("SIZE,...");
  auto* progress = app.add_flag("-p,--progress", opts.progress,
                                "Show progress on stderr (hashing an image without an in-sync index, or --simulate)");
  auto* format = AddFormatOption(app, opts.format, "With --simulate: image format (default: probe)");
  auto* compress = app.add_flag("-c", opts.compress,
                                "With --simulate: also estimate the image convert -c would write (compressing each "
                                "unique cluster)");
  auto* options = app.add_option_function<std::string>(
                         "-o",
                         [](const std::string& v) {
                           if (v == "compression_type=zlib") opts.compression = Compression::kZlib;
                           else if (v == "compression_type=zstd") opts.compression = Compression::kZstd;
                           else throw CLI::ValidationError("-o", "only compression_type=zlib|zstd is taken here");
                         },
                         "With -c: compression_type=zlib (default) or compression_type=zstd")
                      ->option_text("compression_type=TYPE");
  auto* base = app.add_option("--base", opts.base,
                              "With --simulate: also estimate each image as an overlay on BASE (its backing file)")
                   ->option_text("BASE");
  (void)progress;
  for (CLI::Option* o : {sizes, format, compress, base}) o->needs(simulate);
  options->needs(compress);
  app.add_option("FILE", opts.files, "The image (with --simulate: one or more)")->required();
}

int RunDedupStats() {
  if (!opts.simulate && opts.files.size() > 1)
    throw CLI::ValidationError("FILE", "several images are taken only with --simulate");
  if (opts.compress && (opts.files.size() > 1 || !opts.base.empty()))
    throw CLI::ValidationError("-c", "estimates one image; it is not taken with several images or --base");
  if (opts.simulate) return RunSimulate();
  const std::string& file = opts.files[0];
  Progress progress(opts.progress, Progress::Unit::kClusters);
  auto stats = ComputeDedupStats(file, 10, opts.force_share, progress.fn());
  progress.Finish();
  if (!stats.ok()) {
    if (!LooksLikeQcow2(file))
      return Fail(file, stats.status().message() + "; dedup-stats --simulate reads any image");
    return Fail(file, stats.status());
  }
  if (opts.output == OutputFormat::kJson)
    PrintJson(StatsJson(*stats));
  else
    PrintStats(*stats);
  return 0;
}

}  // namespace qcow2dedup::cli
