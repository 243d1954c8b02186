// What deduplication saves in a qcow2 image, through the qcow2dedup
// library's public API: a program built against the installed package
// (examples/CMakeLists.txt with find_package, or pkg-config; README.md,
// "Using the library").
//
//   stats_example IMAGE.qcow2
#include <qcow2dedup/stats.h>
#include <qcow2dedup/version.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s IMAGE.qcow2\n", argv[0]);
    return 2;
  }
  // The library reports; printing is the program's business.
  auto stats = qcow2dedup::ComputeDedupStats(argv[1]);
  if (!stats.ok()) {
    std::fprintf(stderr, "%s: %s\n", argv[1], stats.status().message().c_str());
    return 1;
  }
  const qcow2dedup::DedupStats& s = *stats;
  std::printf("qcow2dedup library %s\n", QCOW2DEDUP_VERSION);
  std::printf("%s: %llu guest clusters of %llu bytes, %llu with data, stored in %llu (dedup ratio %.2f)\n",
              s.filename.c_str(), (unsigned long long)s.guest_clusters, (unsigned long long)s.cluster_size,
              (unsigned long long)s.data_clusters, (unsigned long long)s.stored_clusters, s.dedup_ratio);
  std::printf("saved: %llu bytes\n", (unsigned long long)s.saved_bytes);
  return 0;
}
