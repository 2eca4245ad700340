// How the C++ trainer API reports errors. Functions return absl::Status / StatusOr like the rest of tessera;
// where a status cannot be returned (a sharded block's forward, an autograd hook during backward) it is thrown as
// a StatusError, which keeps the status (code and message) for the trainer's catch.
#pragma once

#include <stdexcept>
#include <utility>

#include "absl/status/status.h"

namespace tessera {

class StatusError : public std::runtime_error {
 public:
  explicit StatusError(absl::Status status)
      : std::runtime_error(status.ToString()), status_(std::move(status)) {}
  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// Throws StatusError unless `status` is OK.
inline void ThrowIfError(absl::Status status) {
  if (!status.ok()) throw StatusError(std::move(status));
}

// The value of `result`, or throws its status as a StatusError.
template <class T>
T ValueOrThrow(absl::StatusOr<T> result) {
  if (!result.ok()) throw StatusError(std::move(result).status());
  return *std::move(result);
}

}  // namespace tessera
