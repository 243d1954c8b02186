// Status and Result: how every library call reports failure.
// The kind says what went wrong (a damaged image is Corruption, a failing
// disk is IOError); the message is one line for a human.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <utility>

#pragma GCC visibility push(default)  // the public API: exported from the shared library

namespace qcow2dedup {

enum class ErrorKind {
  kOk,
  kInvalidArgument,  // the caller asked for something impossible
  kNotFound,         // a file does not exist
  kExists,           // a file exists and may not be replaced
  kCorruption,       // the image contradicts the format or itself
  kUnsupported,      // valid qcow2 that this tool does not handle
  kIOError,          // the operating system failed a read, write or sync
  kNoSpace,          // the file system is full
  kBusy,             // another program holds the image (QEMU's locks)
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string m) { return {ErrorKind::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {ErrorKind::kNotFound, std::move(m)}; }
  static Status Exists(std::string m) { return {ErrorKind::kExists, std::move(m)}; }
  static Status Corruption(std::string m) { return {ErrorKind::kCorruption, std::move(m)}; }
  static Status Unsupported(std::string m) { return {ErrorKind::kUnsupported, std::move(m)}; }
  static Status IOError(std::string m) { return {ErrorKind::kIOError, std::move(m)}; }
  static Status NoSpace(std::string m) { return {ErrorKind::kNoSpace, std::move(m)}; }
  static Status Busy(std::string m) { return {ErrorKind::kBusy, std::move(m)}; }

  bool ok() const { return kind_ == ErrorKind::kOk; }
  ErrorKind kind() const { return kind_; }
  const std::string& message() const { return message_; }

  // The same error with context in front: "L2 table 3: offset beyond end".
  Status Prefixed(const std::string& context) const {
    if (ok()) return *this;
    return {kind_, context + ": " + message_};
  }

 private:
  Status(ErrorKind k, std::string m) : kind_(k), message_(std::move(m)) {}
  ErrorKind kind_ = ErrorKind::kOk;
  std::string message_;
};

// A value or the Status that explains why there is none.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}
  Result(Status status) : status_(std::move(status)) { assert(!status_.ok()); }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & { assert(ok()); return *value_; }
  const T& value() const& { assert(ok()); return *value_; }
  T&& value() && { assert(ok()); return std::move(*value_); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace qcow2dedup

#pragma GCC visibility pop

// Early return on failure, in the style of leveldb's RETURN_IF_ERROR.
#define QD_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::qcow2dedup::Status _qd_s = (expr);     \
    if (!_qd_s.ok()) return _qd_s;           \
  } while (0)

#define QD_CONCAT_INNER(a, b) a##b
#define QD_CONCAT(a, b) QD_CONCAT_INNER(a, b)
// QD_ASSIGN_OR_RETURN(auto x, Foo()): x is Foo()'s value, or we return its Status.
#define QD_ASSIGN_OR_RETURN(decl, expr) \
  QD_ASSIGN_OR_RETURN_IMPL(QD_CONCAT(_qd_r, __LINE__), decl, expr)
#define QD_ASSIGN_OR_RETURN_IMPL(tmp, decl, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  decl = std::move(tmp).value()
