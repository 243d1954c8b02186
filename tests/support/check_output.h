// What of `check`'s output qemu-img shares: the judge's view of our stdout
// and stderr beside `qemu-img check`'s on the same image (the golden cases
// with a `qemu` file, the hostile corpus).
#pragma once

#include <string>

namespace testing {

struct QcowPart {
  std::string out, err;
  bool ours_found_more = false;  // our part counts what qemu-img cannot see (exit 2 for us)
};

// From a tool's stdout and stderr (ours or qemu-img's):
//  - stdout, human: everything before our own part, which starts with the
//    "Dedup index" line ("Dedup:" for info); our wording for a qcow2
//    structure qemu-img calls clean while our own part finds something
//    ("No errors were found in the qcow2 structure.", "No errors that
//    qemu-img counts were found on the image.") reads as qemu-img's "No
//    errors were found on the image.". JSON: the object without our keys
//    ("dedup", "metadata-overlaps", "bad-compressed-clusters").
//  - stderr: the findings, without ours (the dedup index's, and overlaps
//    qemu-img does not report: "ERROR cluster N: ... shares its cluster
//    with other ..."; compressed data that does not decompress, "ERROR
//    compressed cluster at host offset ..."), up to the tool's own failure line, which is kept
//    only as the fact that there is one ("qemu-img: Could not open ...",
//    and any hint after it, against "qcow2dedup: FILE: ...").
QcowPart QcowPartOf(const std::string& out, const std::string& err, bool json);

// The exit code we must give where qemu-img check gives qemu_exit: the
// same, or 2 where our own part found something and qemu-img's check ran.
int ExpectedCheckExit(int qemu_exit, const QcowPart& ours);

}  // namespace testing
