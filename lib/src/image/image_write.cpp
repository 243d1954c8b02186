// Image's write calls: the guest-facing side of the Writer.
#include <fmt/format.h>

#include <cstring>

#include "dedup/hasher.h"
#include "image/image_state.h"
#include "image/writer.h"

namespace qcow2dedup {
namespace {

Result<Writer*> WriterOf(ImageState& s) {
  if (!s.writer) return Status::InvalidArgument("the image is open read-only");
  return s.writer.get();
}

}  // namespace

void PrepareClusterWrite(ClusterWrite& w) {
  w.zero = IsAllZero(w.data);
  if (!w.zero) w.digest = Sha256(w.data);
}

Status Image::WriteClusters(std::span<const ClusterWrite> clusters) {
  QD_ASSIGN_OR_RETURN(Writer * w, WriterOf(*state_));
  return w->WriteClusters(clusters);
}

Status Image::Write(uint64_t offset, std::span<const uint8_t> data) {
  ImageState& s = *state_;
  QD_ASSIGN_OR_RETURN(Writer * writer, WriterOf(s));
  const uint64_t cs = s.cs();
  if (offset > s.header.virtual_size || data.size() > s.header.virtual_size - offset)
    return Status::InvalidArgument(fmt::format("write of {} bytes at offset {} goes beyond the virtual size {}",
                                               data.size(), offset, s.header.virtual_size));
  // Whole clusters straight from the caller; a partial one completed from
  // what the guest sees now (image, backing file or zeros).
  QD_RETURN_IF_ERROR(writer->NoteGuestWrite(offset, data.size()));
  const size_t batch = std::max<size_t>(16, (4u << 20) / cs);
  std::vector<uint8_t> partial;
  std::vector<ClusterWrite> writes;
  uint64_t pos = offset;
  const uint64_t end = offset + data.size();
  while (pos < end) {
    writes.clear();
    partial.assign(2 * cs, 0);
    int used_partial = 0;
    while (pos < end && writes.size() < batch) {
      const uint64_t cluster = pos / cs, in = pos % cs;
      const uint64_t n = std::min<uint64_t>(cs - in, end - pos);
      ClusterWrite w{cluster, {}, false, {}};
      if (n == cs) {
        w.data = data.subspan(pos - offset, cs);
      } else {
        std::span<uint8_t> buf(&partial[used_partial++ * cs], cs);
        const uint64_t cstart = cluster * cs;
        const uint64_t clen = std::min<uint64_t>(cs, s.header.virtual_size - cstart);
        std::memset(buf.data(), 0, cs);
        QD_RETURN_IF_ERROR(Read(cstart, buf.first(clen)));
        std::memcpy(buf.data() + in, data.data() + (pos - offset), n);
        w.data = buf;
      }
      writes.push_back(w);
      pos += n;
      if (used_partial == 2) break;  // at most a head and a tail per batch
    }
    ParallelFor(writes.size(), 16, [&](size_t i) { PrepareClusterWrite(writes[i]); });
    QD_RETURN_IF_ERROR(writer->WriteClusters(writes, /*mark=*/false));
  }
  return Status::Ok();
}

Status Image::Resize(uint64_t new_size) {
  QD_ASSIGN_OR_RETURN(Writer * w, WriterOf(*state_));
  return w->Resize(new_size);
}

Status Image::Flush() { return state_->writer ? state_->writer->Flush() : Status::Ok(); }

Status Image::Close() { return state_->writer ? state_->writer->Close() : Status::Ok(); }

const WriteStats& Image::write_stats() const {
  static const WriteStats none;
  return state_->writer ? state_->writer->stats() : none;
}

size_t Image::index_memory() const { return state_->writer ? state_->writer->index().MemoryBytes() : 0; }

}  // namespace qcow2dedup
