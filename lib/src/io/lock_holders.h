// Who holds QEMU's image locks on an open file, as far as Linux tells.
#pragma once

#include <string>

namespace qcow2dedup {

// "qemu-io (pid 4242)", or several joined by ", ": the processes whose open
// file descriptions hold a lock on QEMU's lock bytes (100 to 299) of the file
// that fd has open; fd itself is left out. Empty when none can be seen.
//
// F_OFD_GETLK cannot say: for an OFD lock it reports l_pid -1, and so does
// /proc/locks. Each lock is listed, though, in the /proc/PID/fdinfo/FD of
// every descriptor that shares it, and only for processes we may inspect
// (our own user's, or all as root): others stay unnamed.
std::string LockHolders(int fd);

}  // namespace qcow2dedup
