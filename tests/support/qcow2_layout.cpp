#include "support/qcow2_layout.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

namespace testing {
namespace {

uint64_t Be(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | p[i];
  return v;
}

class Reader {
 public:
  explicit Reader(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error("cannot open " + path);
    struct stat st;
    if (::fstat(fd_, &st) != 0) throw std::runtime_error("cannot stat " + path);
    size_ = uint64_t(st.st_size);
  }
  ~Reader() {
    if (fd_ >= 0) ::close(fd_);
  }
  uint64_t size() const { return size_; }
  // Reads n bytes at off; a range past the end of the file is an error
  // (every structure the header points at must exist).
  std::vector<uint8_t> Read(uint64_t off, uint64_t n, const char* what) const {
    if (off > size_ || n > size_ - off) {
      std::ostringstream m;
      m << what << " at " << off << " (+" << n << ") is beyond the end of the file (" << size_ << ")";
      throw std::runtime_error(m.str());
    }
    std::vector<uint8_t> buf(n);
    uint64_t done = 0;
    while (done < n) {
      ssize_t r = ::pread(fd_, buf.data() + done, n - done, off_t(off + done));
      if (r <= 0) throw std::runtime_error(std::string("read failed: ") + what);
      done += uint64_t(r);
    }
    return buf;
  }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
};

// Refcount entry i of a refcount block, refcount_bits wide. Widths below 8
// are packed from the least significant bit of each byte (as QEMU does);
// 8 bits and above are big-endian.
uint64_t RefcountEntry(const std::vector<uint8_t>& block, uint32_t bits, uint64_t i) {
  if (bits < 8) {
    const uint64_t per_byte = 8 / bits;
    const uint8_t byte = block[i / per_byte];
    return (byte >> ((i % per_byte) * bits)) & ((1u << bits) - 1);
  }
  const int bytes = int(bits / 8);
  return Be(&block[i * bytes], bytes);
}

void Problem(Qcow2Layout& l, const std::string& m) {
  if (l.problems.size() < 20) l.problems.push_back(m);
}

Qcow2Layout Parse(const std::string& path) {
  Reader f(path);
  Qcow2Layout l;
  l.file_size = f.size();
  std::vector<uint8_t> h = f.Read(0, 104, "header");
  if (Be(&h[0], 4) != 0x514649fbull) throw std::runtime_error("not a qcow2 file (bad magic)");
  l.version = uint32_t(Be(&h[4], 4));
  if (l.version != 3) throw std::runtime_error("only version 3 is understood");
  const uint64_t backing_offset = Be(&h[8], 8);
  const uint32_t backing_size = uint32_t(Be(&h[16], 4));
  const uint32_t cluster_bits = uint32_t(Be(&h[20], 4));
  if (cluster_bits < 9 || cluster_bits > 21) throw std::runtime_error("cluster_bits out of range");
  l.cluster_size = 1ull << cluster_bits;
  l.virtual_size = Be(&h[24], 8);
  if (Be(&h[32], 4) != 0) throw std::runtime_error("encrypted images are not understood");
  l.l1_size = uint32_t(Be(&h[36], 4));
  l.l1_offset = Be(&h[40], 8);
  l.reftable_offset = Be(&h[48], 8);
  l.reftable_clusters = uint32_t(Be(&h[56], 4));
  l.nb_snapshots = uint32_t(Be(&h[60], 4));
  l.incompatible = Be(&h[72], 8);
  l.compatible = Be(&h[80], 8);
  l.autoclear = Be(&h[88], 8);
  const uint32_t refcount_order = uint32_t(Be(&h[96], 4));
  if (refcount_order > 6) throw std::runtime_error("refcount_order out of range");
  l.refcount_bits = 1u << refcount_order;
  const uint32_t header_length = uint32_t(Be(&h[100], 4));
  // Bit 3 (compression type) changes how compressed data reads, not the layout.
  if (l.incompatible & ~(1ull | 8ull))
    throw std::runtime_error("incompatible features other than dirty and compression type are not understood");
  const uint64_t cs = l.cluster_size;

  // Header extensions, from the end of the header to the end marker.
  {
    std::vector<uint8_t> c0 = f.Read(0, std::min<uint64_t>(cs, f.size()), "cluster 0");
    uint64_t pos = header_length;
    while (pos + 8 <= c0.size()) {
      uint32_t magic = uint32_t(Be(&c0[pos], 4)), len = uint32_t(Be(&c0[pos + 4], 4));
      if (magic == 0) break;
      if (pos + 8 + len > c0.size()) throw std::runtime_error("header extension beyond cluster 0");
      l.extensions[magic] = {pos + 8, len};
      if (magic == 0x44445550u && len >= 24) {  // "DDUP"
        l.has_dedup_extension = true;
        l.dedup_index_offset = Be(&c0[pos + 8 + 8], 8);
        l.dedup_index_entries = Be(&c0[pos + 8 + 16], 8);
      }
      pos += 8 + ((uint64_t(len) + 7) & ~7ull);
    }
    if (backing_offset) {
      if (backing_offset + backing_size > c0.size()) throw std::runtime_error("backing file name beyond cluster 0");
      l.backing_file.assign(reinterpret_cast<const char*>(&c0[backing_offset]), backing_size);
    }
  }

  // Expected references per host cluster, counted from every structure.
  std::map<uint64_t, uint64_t> refs;
  auto add = [&](uint64_t offset, uint64_t bytes) {
    for (uint64_t c = offset / cs; c < (offset + bytes + cs - 1) / cs; ++c) ++refs[c];
  };
  add(0, cs);  // the header cluster
  add(l.reftable_offset, uint64_t(l.reftable_clusters) * cs);
  add(l.l1_offset, uint64_t(l.l1_size) * 8);
  if (l.reftable_offset % cs || l.l1_offset % cs) throw std::runtime_error("unaligned table offset");

  // Refcount table and blocks.
  const uint64_t per_block = cs * 8 / l.refcount_bits;
  std::vector<uint8_t> rt = f.Read(l.reftable_offset, uint64_t(l.reftable_clusters) * cs, "refcount table");
  for (uint64_t i = 0; i < rt.size() / 8; ++i) {
    const uint64_t e = Be(&rt[i * 8], 8);
    const uint64_t off = e & ~0x1ffull;
    if (!off) continue;
    if (off % cs) throw std::runtime_error("unaligned refcount block");
    l.refblocks.push_back(off);
    add(off, cs);
    std::vector<uint8_t> block = f.Read(off, cs, "refcount block");
    for (uint64_t j = 0; j < per_block; ++j) {
      const uint64_t r = RefcountEntry(block, l.refcount_bits, j);
      if (r) l.refcounts[i * per_block + j] = r;
    }
  }

  // L1 and L2 tables.
  const uint64_t l2_entries = cs / 8;
  const uint64_t guest_clusters = (l.virtual_size + cs - 1) / cs;
  if (uint64_t(l.l1_size) * l2_entries < guest_clusters) throw std::runtime_error("L1 table too small");
  l.l2_entries.assign(guest_clusters, 0);
  std::vector<uint8_t> l1 = f.Read(l.l1_offset, uint64_t(l.l1_size) * 8, "L1 table");
  // (entry, guest cluster) of every non-compressed L2 entry with a host offset.
  std::vector<std::pair<uint64_t, uint64_t>> host_entries;
  std::vector<std::pair<uint64_t, uint64_t>> l1_with_copied;
  for (uint64_t i = 0; i < l.l1_size; ++i) {
    const uint64_t e = Be(&l1[i * 8], 8);
    const uint64_t off = e & Qcow2Layout::kOffsetMask;
    if (!off) continue;
    if (off % cs) throw std::runtime_error("unaligned L2 table");
    l.l2_tables.push_back(off);
    l1_with_copied.push_back({e, off / cs});
    add(off, cs);
    std::vector<uint8_t> t = f.Read(off, cs, "L2 table");
    for (uint64_t j = 0; j < l2_entries; ++j) {
      const uint64_t g = i * l2_entries + j;
      const uint64_t entry = Be(&t[j * 8], 8);
      if (g >= guest_clusters) {
        if (entry) Problem(l, "L2 entry beyond the virtual size");
        continue;
      }
      l.l2_entries[g] = entry;
      if (entry & Qcow2Layout::kCompressed) {
        // Compressed: x = 62 - (cluster_bits - 8) offset bits, then sectors.
        const uint32_t x = 62 - (cluster_bits - 8);
        const uint64_t host = entry & ((1ull << x) - 1);
        const uint64_t sectors = ((entry & ((1ull << 62) - 1)) >> x) + 1;
        const uint64_t end = (host & ~511ull) + sectors * 512;
        for (uint64_t c = host / cs; c <= (end - 1) / cs; ++c) ++refs[c];
        ++l.compressed_entries;
        continue;
      }
      const uint64_t hoff = entry & Qcow2Layout::kOffsetMask;
      if (!hoff) continue;
      if (hoff % cs) {
        Problem(l, "unaligned data cluster offset");
        continue;
      }
      if (entry & Qcow2Layout::kZero) ++l.zero_alloc_refs[hoff / cs];
      else ++l.data_refs[hoff / cs];
      ++refs[hoff / cs];
      host_entries.push_back({entry, g});
    }
  }

  if (l.nb_snapshots == 0) {
    // Every referenced cluster must carry exactly its references; a
    // refcount without a reference is a leak. (Clusters at or past the
    // dedup index, refcount 0, are free space and not counted.)
    for (const auto& [c, n] : refs) {
      auto it = l.refcounts.find(c);
      const uint64_t stored = it == l.refcounts.end() ? 0 : it->second;
      if (stored != n) {
        ++l.refcount_mismatches;
        Problem(l, "cluster " + std::to_string(c) + ": refcount " + std::to_string(stored) + ", references " +
                       std::to_string(n));
      }
    }
    for (const auto& [c, r] : l.refcounts) {
      if (!refs.count(c)) {
        ++l.refcount_mismatches;
        Problem(l, "cluster " + std::to_string(c) + ": refcount " + std::to_string(r) + " but unreferenced (leak)");
      }
    }
    for (const auto& [entry, g] : host_entries) {
      const uint64_t c = (entry & Qcow2Layout::kOffsetMask) / cs;
      const bool one = l.refcounts.count(c) && l.refcounts.at(c) == 1;
      if (bool(entry & Qcow2Layout::kCopied) != one) {
        ++l.copied_mismatches;
        Problem(l, "guest cluster " + std::to_string(g) + ": COPIED flag disagrees with refcount");
      }
    }
    for (const auto& [e, c] : l1_with_copied) {
      const bool one = l.refcounts.count(c) && l.refcounts.at(c) == 1;
      if (bool(e & Qcow2Layout::kCopied) != one) {
        ++l.copied_mismatches;
        Problem(l, "L2 table at cluster " + std::to_string(c) + ": COPIED flag disagrees with refcount");
      }
    }
  }
  return l;
}

}  // namespace

uint64_t Qcow2Layout::data_references() const {
  uint64_t n = 0;
  for (const auto& [c, r] : data_refs) n += r;
  return n;
}

uint64_t Qcow2Layout::max_sharing() const {
  uint64_t m = 0;
  for (const auto& [c, r] : data_refs) m = std::max(m, r);
  return m;
}

uint64_t Qcow2Layout::HostOffset(uint64_t g) const {
  if (g >= l2_entries.size()) return 0;
  const uint64_t e = l2_entries[g];
  if ((e & kCompressed) || (e & kZero)) return 0;
  return e & kOffsetMask;
}

std::optional<Qcow2Layout> ReadQcow2Layout(const std::string& path, std::string* error) {
  try {
    return Parse(path);
  } catch (const std::exception& e) {
    if (error) *error = e.what();
    return std::nullopt;
  }
}

std::string ReadFileBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void WriteFileBytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

uint64_t FileSize(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return 0;
  return uint64_t(st.st_size);
}

}  // namespace testing
