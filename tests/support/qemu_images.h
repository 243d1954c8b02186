// Helpers for the interop tests: build images with stock QEMU tools, patch
// their bytes, and compare what qcow2dedup says about them with what
// qemu-img says.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "support/process.h"

namespace testing::images {

// Runs cmd and fails the current test (REQUIRE) unless it exits 0; the
// message shows the command and everything it printed.
RunResult MustRun(const std::string& cmd);

// Runs `cd DIR && cmd` when dir is not empty.
std::string InDir(const std::string& dir, const std::string& cmd);

// "qemu-io -f FMT -c 'c1' -c 'c2' ... IMG", which must succeed.
void QemuIo(const std::string& image, const std::vector<std::string>& commands,
            const std::string& format = "qcow2", const std::string& cwd = "");

// qemu-img info --output=json / qcow2dedup info --output=json, parsed; both
// must succeed. The filename is passed as given (relative to cwd).
nlohmann::json QemuInfo(const std::string& image, const std::string& cwd = "");
nlohmann::json OurInfo(const std::string& image, const std::string& cwd = "");

// Checks (doctest CHECK) that ours agrees with qemu-img's info on the keys
// qemu-img prints: a key qemu-img prints must be in ours with the same value,
// a key of the list below qemu-img leaves out must be absent from ours too.
void CompareInfo(const nlohmann::json& ours, const nlohmann::json& qemu);

// Whole files as bytes.
std::string ReadBytes(const std::string& path);
void WriteBytes(const std::string& path, const std::string& data);
// Overwrites bytes at offset (the file keeps its length unless it grows).
void PatchFile(const std::string& path, uint64_t offset, const std::string& bytes);
bool FileExists(const std::string& path);

// Big-endian encodings and decodings, for header fields.
std::string BE16(uint16_t v);
std::string BE32(uint32_t v);
std::string BE64(uint64_t v);
uint64_t GetBE(const std::string& data, size_t offset, int bytes);

// Bytes the file occupies on disk (st_blocks * 512).
uint64_t AllocatedBytes(const std::string& path);

// Deterministic pseudo-random bytes.
std::string RandomBytes(size_t n, uint32_t seed);

// Lines of text (a final newline does not start an empty line).
std::vector<std::string> Lines(const std::string& text);

// True if err is exactly one line starting with "qcow2dedup: ".
bool IsOneErrorLine(const std::string& err);

// A hash of a file's bytes, for "unchanged" checks.
std::string FileDigest(const std::string& path);

}  // namespace testing::images
