#include "io/lock_holders.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace qcow2dedup {
namespace {

constexpr unsigned long kFirstLockByte = 100, kLastLockByte = 299;
constexpr size_t kMaxNamed = 3;

std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] >= '0' && e->d_name[0] <= '9') out.push_back(e->d_name);
  ::closedir(d);
  return out;
}

// An fdinfo "lock:" line ends in "START END" (END may be EOF).
bool LocksQemuBytes(const std::string& fdinfo) {
  std::ifstream in(fdinfo);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("lock:", 0) != 0) continue;
    std::istringstream words(line);
    std::vector<std::string> w;
    for (std::string x; words >> x;) w.push_back(x);
    if (w.size() < 2) continue;
    const unsigned long start = std::strtoul(w[w.size() - 2].c_str(), nullptr, 10);
    const unsigned long end = w.back() == "EOF" ? ~0ul : std::strtoul(w.back().c_str(), nullptr, 10);
    if (start <= kLastLockByte && end >= kFirstLockByte) return true;
  }
  return false;
}

std::string Command(const std::string& pid) {
  std::ifstream in("/proc/" + pid + "/comm");
  std::string name;
  std::getline(in, name);
  return name.empty() ? "a process" : name;
}

}  // namespace

std::string LockHolders(int fd) {
  struct stat self;
  if (::fstat(fd, &self) != 0) return "";
  const std::string me = std::to_string(::getpid()), my_fd = std::to_string(fd);
  std::string names;
  size_t named = 0;
  for (const std::string& pid : Entries("/proc")) {
    for (const std::string& n : Entries("/proc/" + pid + "/fd")) {
      if (pid == me && n == my_fd) continue;
      struct stat st;
      if (::stat(("/proc/" + pid + "/fd/" + n).c_str(), &st) != 0) continue;
      if (st.st_dev != self.st_dev || st.st_ino != self.st_ino) continue;
      if (!LocksQemuBytes("/proc/" + pid + "/fdinfo/" + n)) continue;
      names += (names.empty() ? "" : ", ") + (pid == me ? "this process" : Command(pid)) + " (pid " + pid + ")";
      if (++named == kMaxNamed) return names;
      break;  // one line per process
    }
  }
  return names;
}

}  // namespace qcow2dedup
