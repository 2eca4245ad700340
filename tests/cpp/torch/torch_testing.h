// Helpers for tests of torch_rt::Unit: ranks as threads over the `local` communicator, and the parameter
// adoption the Python glue does (python/tessera/shard/runtime.py, UnitRuntime.install).
#pragma once

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tessera/comm/local/local_communicator.h"
#include "tessera/torch/unit.h"

namespace tessera::testing {

using CommFactory = std::function<absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>>(int world)>;

// Runs fn(rank, comm) on one thread per rank of a fresh world (the `local` backend unless `factory` says
// otherwise); returns each rank's status. Rank bodies return a Status rather than assert, so that the main thread
// reports every rank's failure.
inline std::vector<absl::Status> OnRanks(
    int world, const std::function<absl::Status(int, std::shared_ptr<comm::Communicator>)>& fn,
    const CommFactory& factory = &comm::LocalWorld::CreateCommunicators) {
  auto comms = factory(world);
  if (!comms.ok()) return std::vector<absl::Status>(world, comms.status());
  std::vector<absl::Status> statuses(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    std::shared_ptr<comm::Communicator> c = std::move((*comms)[r]);
    threads.emplace_back([&statuses, &fn, r, c] { statuses[r] = fn(r, c); });
  }
  for (auto& t : threads) t.join();
  return statuses;
}

inline void ExpectAllOk(const std::vector<absl::Status>& statuses) {
  for (size_t r = 0; r < statuses.size(); ++r) EXPECT_TRUE(statuses[r].ok()) << "rank " << r << ": " << statuses[r];
}

// Deterministic random tensors, made on the main thread before the ranks start (the reference needs them too).
inline at::Tensor Randn(at::IntArrayRef shape, at::Generator& gen, at::ScalarType dtype = at::kDouble) {
  return at::randn(shape, gen, at::TensorOptions().dtype(dtype));
}
inline at::Generator MakeGenerator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// Unit options for tests: a rank that went wrong makes its peers fail within seconds instead of hanging them.
inline torch_rt::UnitOptions TestOptions(const std::string& name) {
  torch_rt::UnitOptions options;
  options.name = name;
  options.timeout = absl::Seconds(30);
  return options;
}

// Creates a unit and adopts leaf tensors over its views, as Python's nn.Parameter(view) does: the sharded ones are
// what the optimizer sees, the unsharded ones what the module computes with (autograd accumulates into their .grad).
inline absl::StatusOr<std::unique_ptr<torch_rt::Unit>> MakeAdoptedUnit(std::shared_ptr<comm::Communicator> comm,
                                                                       const std::vector<at::Tensor>& params,
                                                                       const std::vector<std::string>& names,
                                                                       int64_t num_trainable,
                                                                       torch_rt::UnitOptions options) {
  auto unit = torch_rt::Unit::Create(std::move(comm), params, names, num_trainable, std::move(options));
  if (!unit.ok()) return unit.status();
  std::vector<at::Tensor> sharded, full;
  for (int64_t i = 0; i < (*unit)->num_params(); ++i) {
    const bool trainable = i < num_trainable;
    sharded.push_back((*unit)->sharded_params()[i].detach().set_requires_grad(trainable));
    full.push_back((*unit)->full_params()[i].detach().set_requires_grad(trainable));
  }
  absl::Status adopted = (*unit)->AdoptParams(sharded, full);
  if (!adopted.ok()) return adopted;
  return unit;
}

// The slice of `full` (flattened) that `rank` of `world` owns, written out from the layout's definition
// (shard/plan.h: chunks of ceil(numel / world) elements, chunk r to rank r, the last ones short or empty) rather
// than taken from the plan under test.
inline at::Tensor OwnedSlice(const at::Tensor& full, int rank, int world) {
  const int64_t n = full.numel();
  const int64_t chunk = (n + world - 1) / world;
  const int64_t start = std::min<int64_t>(n, rank * chunk);
  return full.reshape({-1}).narrow(0, start, std::min<int64_t>(chunk, n - start));
}
// What the unit's rank holds of `full`: its owned slice, or all of it when replicated (NO_SHARD).
inline at::Tensor OwnedSlice(const torch_rt::Unit& unit, const at::Tensor& full) {
  if (!unit.options().shard) return full.reshape({-1});
  return OwnedSlice(full, unit.group_rank(), unit.group_size());
}

// OK if `got` matches `want` (same shape, values within tol); otherwise an error naming `what`.
inline absl::Status Near(const at::Tensor& got, const at::Tensor& want, const std::string& what, double tol = 1e-12) {
  if (!got.defined()) return absl::InternalError(absl::StrFormat("%s: undefined, expected a tensor", what));
  if (got.sizes() != want.sizes()) {
    return absl::InternalError(absl::StrFormat("%s: shape %s, expected %s", what, c10::str(got.sizes()),
                                               c10::str(want.sizes())));
  }
  if (got.numel() == 0) return absl::OkStatus();
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = 1.0 + want.to(at::kDouble).abs().max().item<double>();
  if (!(err <= tol * scale)) {
    return absl::InternalError(absl::StrFormat("%s: max abs error %g > %g\n got %s\n want %s", what, err, tol * scale,
                                               c10::str(got), c10::str(want)));
  }
  return absl::OkStatus();
}

}  // namespace tessera::testing
