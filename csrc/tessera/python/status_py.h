// Turns an absl::Status into a Python exception of a tessera class (tessera.errors), keeping the message.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include "absl/status/statusor.h"

namespace tessera::python {

[[noreturn]] void RaiseStatus(const absl::Status& status);

inline void ThrowIfError(const absl::Status& status) {
  if (!status.ok()) RaiseStatus(status);
}

template <typename T>
T ValueOrThrow(absl::StatusOr<T> s) {
  if (!s.ok()) RaiseStatus(s.status());
  return std::move(s).value();
}

void BindComm(pybind11::module_& m);
void BindShard(pybind11::module_& m);
void BindKernels(pybind11::module_& m);
void BindCheckpoint(pybind11::module_& m);

}  // namespace tessera::python
