#include "io/vetted_stamps.h"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "qcow2dedup/image.h"

namespace qcow2dedup {
namespace {

constexpr uint64_t kMagic = 0x7164766574746564ull;  // "qdvetted"

// A slot on disk: fields, then a check over them, so that a torn or foreign
// slot is told from a record.
struct Slot {
  std::array<uint64_t, 7> fields{};  // magic, device, inode, size, ctime s, ctime ns, check
  uint8_t pad[8]{};
};
static_assert(sizeof(Slot) == 64);

uint64_t Mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h * 0xff51afd7ed558ccdull;
}

Slot Encode(const FileStamp& s) {
  Slot slot;
  slot.fields = {kMagic, s.device, s.inode, s.size, uint64_t(s.ctime_sec), uint64_t(s.ctime_nsec), 0};
  uint64_t h = 0;
  for (size_t i = 0; i < 6; ++i) h = Mix(h, slot.fields[i]);
  slot.fields[6] = h;
  return slot;
}

off_t SlotOffset(const FileStamp& s) {
  return off_t(Mix(Mix(1, s.device), s.inode) % VettedStamps::kSlots * sizeof(Slot));
}

bool Later(const timespec& now, const FileStamp& s) {
  return now.tv_sec > s.ctime_sec || (now.tv_sec == s.ctime_sec && now.tv_nsec > s.ctime_nsec);
}

std::mutex g_path_mutex;
std::optional<VettedStamps> g_stamps;

}  // namespace

bool VettedStamps::Vouches(const FileStamp& stamp) const {
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  Slot got;
  const bool read = ::pread(fd, &got, sizeof got, SlotOffset(stamp)) == ssize_t(sizeof got);
  ::close(fd);
  return read && std::memcmp(got.fields.data(), Encode(stamp).fields.data(), sizeof got.fields) == 0;
}

void VettedStamps::Record(const FileStamp& stamp) const {
  // File times come from a clock that ticks every few milliseconds: a write
  // within the tick of our last one could leave the change time as it is.
  // Past that tick, every write moves it.
  for (int waited = 0;; ++waited) {
    timespec now;
    ::clock_gettime(CLOCK_REALTIME_COARSE, &now);
    if (Later(now, stamp)) break;
    if (waited == 50) return;
    const timespec ms{0, 1000000};
    ::nanosleep(&ms, nullptr);
  }
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path_).parent_path(), ec);
  const int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return;
  const Slot slot = Encode(stamp);
  // Not synced: a record lost to a power cut costs one pass.
  (void)!::pwrite(fd, &slot, sizeof slot, SlotOffset(stamp));
  ::close(fd);
}

std::optional<VettedStamps> ProcessVettedStamps() {
  std::lock_guard lock(g_path_mutex);
  return g_stamps;
}

std::string DefaultVettedStampsPath() {
  if (const char* cache = std::getenv("XDG_CACHE_HOME"); cache && *cache == '/')
    return std::string(cache) + "/qcow2dedup/vetted";
  if (const char* home = std::getenv("HOME"); home && *home == '/') return std::string(home) + "/.cache/qcow2dedup/vetted";
  return "";
}

void SetVettedStampsPath(std::string path) {
  std::lock_guard lock(g_path_mutex);
  if (path.empty()) g_stamps.reset();
  else g_stamps.emplace(std::move(path));
}

}  // namespace qcow2dedup
