#include "dedup/sha256.h"

#include <openssl/evp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

namespace qcow2dedup {

namespace {

// Fetched once: EVP_sha256() makes every init look the algorithm up again
// under a lock, which costs more than hashing a 4 KiB cluster.
const EVP_MD* Sha256Md() {
  static EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  return md;
}

[[noreturn]] void Fail() { throw std::runtime_error("OpenSSL SHA-256 failed"); }  // out of memory inside OpenSSL

void Begin(EVP_MD_CTX* ctx) {
  if (!ctx || !Sha256Md() || EVP_DigestInit_ex2(ctx, Sha256Md(), nullptr) != 1) Fail();
}

void Add(EVP_MD_CTX* ctx, std::span<const uint8_t> data) {
  if (EVP_DigestUpdate(ctx, data.data(), data.size()) != 1) Fail();
}

std::atomic<size_t> digest_bytes{32};  // SetDigestBytesForTesting

Digest End(EVP_MD_CTX* ctx) {
  Digest d;
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx, d.data(), &len) != 1 || len != d.size()) Fail();
  if (const size_t n = digest_bytes.load(std::memory_order_relaxed); n < d.size()) std::fill(d.begin() + long(n), d.end(), 0);
  return d;
}

}  // namespace

Digest Sha256(std::span<const uint8_t> data) {
  // One context per thread: creating one per cluster costs more than hashing 4 KiB.
  thread_local struct Ctx {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    ~Ctx() { EVP_MD_CTX_free(ctx); }
  } t;
  Begin(t.ctx);
  Add(t.ctx, data);
  return End(t.ctx);
}

void SetDigestBytesForTesting(size_t n) { digest_bytes.store(std::min<size_t>(n, 32), std::memory_order_relaxed); }

Sha256Stream::Sha256Stream() : ctx_(EVP_MD_CTX_new()) { Begin(ctx_); }
Sha256Stream::~Sha256Stream() { EVP_MD_CTX_free(ctx_); }
void Sha256Stream::Update(std::span<const uint8_t> data) { Add(ctx_, data); }
Digest Sha256Stream::Finish() { return End(ctx_); }

bool IsAllZero(std::span<const uint8_t> data) {
  const uint8_t* p = data.data();
  size_t n = data.size();
  while (n >= 64) {
    uint64_t w[8];
    std::memcpy(w, p, 64);
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return false;
    p += 64;
    n -= 64;
  }
  while (n--)
    if (*p++) return false;
  return true;
}

}  // namespace qcow2dedup
