// The guest view: each range is looked up in the cluster map and the plan
// executed: zeros, backing data, host data or a decompressed cluster.
#include <fmt/format.h>

#include <cstring>

#include "format/compression.h"
#include "image/image_state.h"

namespace qcow2dedup {
namespace {

Status ReadBacking(ImageState& s, uint64_t offset, std::span<uint8_t> buf) {
  if (!s.backing) {
    std::memset(buf.data(), 0, buf.size());
    return Status::Ok();
  }
  // A backing file smaller than the image reads as zero past its end.
  const uint64_t bsize = s.backing->virtual_size();
  uint64_t n = offset >= bsize ? 0 : std::min<uint64_t>(buf.size(), bsize - offset);
  if (n) QD_RETURN_IF_ERROR(s.backing->Read(offset, buf.first(n)));
  std::memset(buf.data() + n, 0, buf.size() - n);
  return Status::Ok();
}

Status ReadCompressed(ImageState& s, uint64_t entry, uint64_t in_cluster, std::span<uint8_t> buf) {
  const uint64_t cs = s.cs();
  if (s.decompressed.size() != cs || s.decompressed_entry != entry) {
    CompressedDescriptor d = DecodeCompressed(entry, s.header.cluster_bits);
    // A descriptor may claim more than a cluster's worth; QEMU caps it too.
    uint64_t bytes = std::min<uint64_t>(d.bytes, 2 * cs + 512);
    std::vector<uint8_t> in(bytes);
    QD_RETURN_IF_ERROR(s.FlushPendingData(d.offset, bytes));
    QD_RETURN_IF_ERROR(s.file->ReadAt(d.offset, in));
    s.decompressed.resize(cs);
    s.decompressed_entry = 0;
    QD_RETURN_IF_ERROR(Decompress(s.header.compression, in, s.decompressed));
    s.decompressed_entry = entry;
  }
  std::memcpy(buf.data(), s.decompressed.data() + in_cluster, buf.size());
  return Status::Ok();
}

}  // namespace

Status Image::Read(uint64_t offset, std::span<uint8_t> buf) {
  ImageState& s = *state_;
  if (offset > s.header.virtual_size || buf.size() > s.header.virtual_size - offset)
    return Status::InvalidArgument(fmt::format("read of {} bytes at {} is beyond the virtual size {}", buf.size(),
                                               offset, s.header.virtual_size));
  size_t done = 0;
  while (done < buf.size()) {
    const uint64_t at = offset + done;
    QD_ASSIGN_OR_RETURN(Plan p, s.map->Lookup(at));
    const uint64_t n = std::min<uint64_t>(p.length, buf.size() - done);
    std::span<uint8_t> part = buf.subspan(done, n);
    switch (p.kind) {
      case ClusterKind::kUnallocated:
        QD_RETURN_IF_ERROR(ReadBacking(s, at, part));
        break;
      case ClusterKind::kZero:
        std::memset(part.data(), 0, n);
        break;
      case ClusterKind::kData: {
        // Guest clusters whose host clusters follow one another are read in
        // one go: a read a cluster costs a system call each (and a wait on
        // the disk each, from a cold cache).
        uint64_t run = n;
        while (done + run < buf.size()) {
          QD_ASSIGN_OR_RETURN(Plan next, s.map->Lookup(at + run));
          if (next.kind != ClusterKind::kData || next.host_offset != p.host_offset + run) break;
          run += std::min<uint64_t>(next.length, buf.size() - done - run);
        }
        part = buf.subspan(done, run);
        QD_RETURN_IF_ERROR(s.FlushPendingData(p.host_offset, run));
        QD_RETURN_IF_ERROR(s.file->ReadAt(p.host_offset, part));
        done += run;
        continue;
      }
      case ClusterKind::kCompressed:
        QD_RETURN_IF_ERROR(ReadCompressed(s, p.entry, at & (s.cs() - 1), part));
        break;
    }
    done += n;
  }
  return Status::Ok();
}

void Image::Prefetch(uint64_t offset, uint64_t len) {
  // A deduplicated image's guest clusters lie all over the file: read one
  // by one, each waits for the disk. Asked for ahead, they are read side
  // by side. Errors are left for the read to meet.
  ImageState& s = *state_;
  if (offset >= s.header.virtual_size) return;
  len = std::min(len, s.header.virtual_size - offset);
  uint64_t run_at = 0, run_len = 0;  // host bytes not asked for yet
  auto ask = [&] {
    if (run_len) s.file->Prefetch(run_at, run_len);
    run_len = 0;
  };
  for (uint64_t done = 0; done < len;) {
    const uint64_t at = offset + done;
    auto p = s.map->Lookup(at);
    if (!p.ok()) break;
    const uint64_t n = std::min<uint64_t>(p->length, len - done);
    if (p->kind == ClusterKind::kData) {
      if (!run_len || p->host_offset != run_at + run_len) ask(), run_at = p->host_offset;
      run_len += n;
    } else if (p->kind == ClusterKind::kCompressed) {
      ask();
      const CompressedDescriptor d = DecodeCompressed(p->entry, s.header.cluster_bits);
      s.file->Prefetch(d.offset, d.bytes);
    } else if (p->kind == ClusterKind::kUnallocated && s.backing) {
      s.backing->Prefetch(at, n);
    }
    done += n;
  }
  ask();
}

Result<uint64_t> Image::ZeroRun(uint64_t offset) {
  ImageState& s = *state_;
  uint64_t run = 0;
  // Bounded so a huge empty disk still reports progress.
  const uint64_t limit = std::min<uint64_t>(s.header.virtual_size - std::min(offset, s.header.virtual_size), 1ull << 30);
  while (run < limit) {
    const uint64_t at = offset + run;
    QD_ASSIGN_OR_RETURN(Plan p, s.map->Lookup(at));
    uint64_t n = std::min<uint64_t>(p.length, limit - run);
    if (p.kind == ClusterKind::kZero) {
      run += n;
    } else if (p.kind == ClusterKind::kUnallocated) {
      if (!s.backing || at >= s.backing->virtual_size()) {
        run += n;
        continue;
      }
      QD_ASSIGN_OR_RETURN(uint64_t b, s.backing->ZeroRun(at));
      if (b < n) return run + b;
      run += n;
    } else {
      break;
    }
  }
  return run;
}

}  // namespace qcow2dedup
