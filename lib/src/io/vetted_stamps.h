// What we remember, outside the image, of the images our write sessions
// closed cleanly: each one's identity (device, inode), size and change time
// at that moment. A writable open runs the full metadata pass (the only
// thing that sees refcounts too low or two L1 entries sharing an L2 table)
// unless the file still has exactly that stamp: then no byte of it has
// changed since a session of ours left it consistent, and the pass would
// only find what we left. Anyone else's write, a copy, a restore or a
// truncation changes the stamp. Advisory, as the dedup index is: a lost,
// torn or evicted record costs one pass, never trust.
//
// One file of fixed size (kSlots records of 64 bytes, one per image, found
// by hashing its identity), so it never grows with the images written.
#pragma once

#include <optional>
#include <string>

#include "qcow2dedup/file.h"

namespace qcow2dedup {

class VettedStamps {
 public:
  static constexpr uint64_t kSlots = 4096;

  explicit VettedStamps(std::string path) : path_(std::move(path)) {}

  // True if stamp is the one recorded for its file.
  bool Vouches(const FileStamp& stamp) const;
  // Remembers stamp for its file (replacing whatever shared its slot).
  // Waits, at most a few milliseconds, until the clock has passed the
  // stamp's change time, so that any later write changes it; gives up
  // silently (nothing recorded) if it cannot.
  void Record(const FileStamp& stamp) const;

 private:
  std::string path_;
};

// The process's store: empty (the library's default) keeps none, so every
// writable open runs the pass. The command-line tool and the NBD plugin
// set it (SetVettedStampsPath in qcow2dedup/image.h).
std::optional<VettedStamps> ProcessVettedStamps();

}  // namespace qcow2dedup
