// Turns an absl::Status into a Python exception of a tessera class (tessera.errors), keeping the message.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include "absl/status/statusor.h"

namespace tessera::python {

[[noreturn]] void RaiseStatus(const absl::Status& status);

inline void ThrowIfError(const absl::Status& status) {
  if (!status.ok()) RaiseStatus(status);
}

// Runs f() with the GIL released. [Note: never wait on a collective holding the GIL] Every binding that may wait
// for a collective must go through this: c10d's gloo worker thread restores the issuing thread's thread-local state
// (ThreadLocalState) before running a collective, and that state holds Python objects when the collective was issued
// under torch.autograd.graph.saved_tensors_hooks (non-reentrant activation checkpointing does this). Copying them
// takes the GIL, so a caller holding the GIL while it waits deadlocks its own collective (seen in CI as a 600 s
// all-gather timeout in Unit.reshard; tests/python/shard/test_shard_training.py::test_activation_checkpointing).
template <typename F>
auto NoGil(F&& f) -> decltype(f()) {
  pybind11::gil_scoped_release release;
  return f();
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
