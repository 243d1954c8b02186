#include "check/context.h"

#include <cstring>
#include <vector>

namespace qcow2dedup::check {

namespace {
constexpr size_t kMaxMessages = 20000;
constexpr const char* kOverflowNote = "(further findings are not listed)";
}

Status Context::Read(uint64_t offset, std::span<uint8_t> buf) {
  if (buf.empty()) return Status::Ok();
  const uint64_t inside = offset >= file_size ? 0 : std::min<uint64_t>(buf.size(), file_size - offset);
  if (inside) QD_RETURN_IF_ERROR(file->ReadAt(offset, buf.first(inside)));
  std::memset(buf.data() + inside, 0, buf.size() - inside);
  return Status::Ok();
}

Status Context::Write(uint64_t offset, std::span<const uint8_t> data) {
  if (!writable) return Status::InvalidArgument("check opened the image read-only");
  QD_RETURN_IF_ERROR(file->WriteAt(offset, data));
  file_size = std::max(file_size, offset + data.size());
  return Status::Ok();
}

Status Context::WriteHeaderField(uint64_t at, uint64_t value, int bytes) {
  uint8_t buf[8];
  for (int i = bytes; i-- > 0;) {
    buf[i] = uint8_t(value);
    value >>= 8;
  }
  return Write(at, std::span<const uint8_t>(buf, size_t(bytes)));
}

Result<uint64_t> Context::RefreshFileSize() {
  QD_ASSIGN_OR_RETURN(file_size, file->Size());
  return file_size;
}

void Note(CheckReport& r, Finding f) {
  if (r.findings.size() < kMaxMessages) {
    r.findings.push_back(std::move(f));
  } else if (r.findings.size() == kMaxMessages) {
    r.findings.push_back({f.area, FindingKind::kNote, std::nullopt, kOverflowNote});
  }
}

bool Full(const CheckReport& r) { return r.findings.size() >= kMaxMessages; }

bool IsOverflowNote(const Finding& f) { return f.kind == FindingKind::kNote && f.text == kOverflowNote; }

void NoteAll(CheckReport& into, const CheckReport& from) {
  for (const Finding& f : from.findings) Note(into, f);
}

const char* Word(FindingKind kind) {
  switch (kind) {
    case FindingKind::kError: return "ERROR";
    case FindingKind::kLeak: return "Leaked";
    case FindingKind::kRepaired: return "Repairing";
    case FindingKind::kNote: break;
  }
  return "";
}

}  // namespace qcow2dedup::check
