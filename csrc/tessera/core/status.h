// Status helpers shared by every layer: propagation macros that add context, and the CHECK family for bugs.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace tessera {

// Returns `status` with `context` prepended to its message, keeping the code.
inline absl::Status WithContext(const absl::Status& status, const std::string& context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

[[noreturn]] inline void CheckFailed(const char* file, int line, const char* expr, const std::string& msg) {
  std::fprintf(stderr, "tessera CHECK failed at %s:%d: %s %s\n", file, line, expr, msg.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace tessera

#define TESSERA_STATUS_CONCAT_INNER(a, b) a##b
#define TESSERA_STATUS_CONCAT(a, b) TESSERA_STATUS_CONCAT_INNER(a, b)

// Returns early from the enclosing function if `expr` is not OK.
#define TESSERA_RETURN_IF_ERROR(expr)                    \
  do {                                                   \
    ::absl::Status _tessera_status = (expr);             \
    if (!_tessera_status.ok()) return _tessera_status;   \
  } while (0)

// Same, prefixing `context` (anything absl::StrCat accepts) to the message.
#define TESSERA_RETURN_IF_ERROR_CTX(expr, ...)                                             \
  do {                                                                                     \
    ::absl::Status _tessera_status = (expr);                                               \
    if (!_tessera_status.ok())                                                             \
      return ::tessera::WithContext(_tessera_status, ::absl::StrCat(__VA_ARGS__));         \
  } while (0)

#define TESSERA_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()

#define TESSERA_ASSIGN_OR_RETURN(lhs, expr) \
  TESSERA_ASSIGN_OR_RETURN_IMPL(TESSERA_STATUS_CONCAT(_tessera_sor_, __LINE__), lhs, expr)

// Broken invariants (bugs, not user errors) abort with file:line.
#define TESSERA_CHECK(cond, ...)                                                            \
  do {                                                                                      \
    if (!(cond)) ::tessera::CheckFailed(__FILE__, __LINE__, #cond, ::absl::StrCat(__VA_ARGS__)); \
  } while (0)
