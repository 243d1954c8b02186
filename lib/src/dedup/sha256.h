// SHA-256 of a cluster, through OpenSSL's EVP interface.
#pragma once

#include <array>
#include <cstdint>
#include <span>

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX

namespace qcow2dedup {

using Digest = std::array<uint8_t, 32>;

Digest Sha256(std::span<const uint8_t> data);

// SHA-256 of data that arrives in pieces (an index too large to hold twice).
class Sha256Stream {
 public:
  Sha256Stream();
  ~Sha256Stream();
  Sha256Stream(const Sha256Stream&) = delete;
  Sha256Stream& operator=(const Sha256Stream&) = delete;
  void Update(std::span<const uint8_t> data);
  Digest Finish();

 private:
  ::evp_md_ctx_st* ctx_;
};

// Tests only: every digest from here on keeps its first n bytes, the rest
// zero, so that different data collide on purpose (32: SHA-256 itself).
void SetDigestBytesForTesting(size_t n);

// True if every byte is zero (fast: compares words).
bool IsAllZero(std::span<const uint8_t> data);

}  // namespace qcow2dedup
