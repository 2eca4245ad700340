// Sharding a libtorch C++ model (DESIGN.md section 4, the C++ trainer API). C++ modules have no forward hooks, so
// tessera wraps each block: calling the wrapper runs the unit's pre-forward (all-gather its parameters), the
// block's own forward, and its post-forward (free them again, hook the backward). Autograd hooks drive the
// backward: the output's gradient hook is the pre-backward, the gradient hook of an alias of each input is
// the post-backward (reduce-scatter the gradients), and a callback queued on the autograd engine ends the backward.
// All of it drives the same C++ StepSchedule (shard/schedule.h) and torch_rt::Unit (torch/unit.h) as the Python
// path (python/tessera/shard/runtime.py), so both compute the same values.
//
//   tessera::ShardedModel fsdp(world->comm());
//   for (size_t i = 0; i < model->layers.size(); ++i) {
//     auto block = tessera::ValueOrThrow(tessera::Shard(fsdp, model->layers[i], "layers." + std::to_string(i)));
//     model->run_layer = ...  // the model calls block(x, cos, sin) for layer i
//   }
//   auto root = tessera::ValueOrThrow(tessera::ShardRoot(fsdp, model));  // embeddings, final norm, head
//   at::Tensor logits = root(tokens);  // forward; loss.backward() reduce-scatters; then optimizer.Step()
//
// After sharding, a module's own parameter tensors hold their values only while its unit is unsharded (inside
// its forward and backward); between steps use ShardedModel (the local shards, full_state_dict()). Activation
// checkpointing and freezing parameters after sharding are not supported in C++ yet.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tessera/api/checkpoint_tensor.h"
#include "tessera/api/status_error.h"
#include "tessera/comm/communicator.h"
#include "tessera/shard/schedule.h"
#include "tessera/torch/unit.h"

namespace tessera {

enum class ShardingStrategy {
  kFullShard,    // parameters, gradients and optimizer state sharded; parameters freed after forward (ZeRO-3)
  kShardGradOp,  // as kFullShard, but parameters stay gathered from forward to backward (ZeRO-2)
  kNoShard,      // replicated parameters, gradients all-reduced (DDP)
};

struct ShardOptions {
  ShardingStrategy strategy = ShardingStrategy::kFullShard;
  std::optional<at::ScalarType> param_dtype;   // dtype forward/backward compute in (default: the parameters')
  std::optional<at::ScalarType> reduce_dtype;  // dtype gradients are reduced in (default: param_dtype)
  absl::Duration collective_timeout = comm::kDefaultCollectiveTimeout;  // every collective of every unit
};

// The sharding of one model: its units (the blocks in the order they were sharded, then the root) and the step
// schedule that drives them. Not copyable; the modules it shards must outlive it.
class ShardedModel {
 public:
  explicit ShardedModel(std::shared_ptr<comm::Communicator> comm, ShardOptions options = {});
  ~ShardedModel();
  ShardedModel(const ShardedModel&) = delete;
  ShardedModel& operator=(const ShardedModel&) = delete;

  // Makes `module`'s parameters that no earlier unit took into one unit named `name` (the prefix of its
  // parameters' names in checkpoints: "layers.0" gives "layers.0.attention.wq.weight"). Blocks first, in forward
  // order, then the root. Errors: InvalidArgument (no parameters left, a non-floating parameter, mixed devices or
  // dtypes), FailedPrecondition (called after ShardRoot).
  absl::StatusOr<int> ShardBlock(torch::nn::Module& module, const std::string& name);
  // The root unit: `root`'s remaining parameters (embeddings, final norm, head) under their own names. Completes
  // the model; forwards may run from now on.
  absl::StatusOr<int> ShardRoot(torch::nn::Module& root);

  // Runs unit `u`'s forward: pre-forward, fn(inputs) (inputs that require grad are wrapped for the post-backward),
  // post-forward. Throws StatusError (a failed collective, a call before ShardRoot).
  at::Tensor RunUnit(int u, std::vector<at::Tensor> inputs,
                     const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fn);

  // Units in the order they were sharded (the blocks, then the root).
  int num_units() const { return static_cast<int>(units_.size()); }
  torch_rt::Unit& unit(int u) { return *units_[u]; }
  const torch_rt::Unit& unit(int u) const { return *units_[u]; }
  // Checkpoint names of unit u's parameters, layout order ("layers.0.attention.wq.weight").
  const std::vector<std::string>& param_names(int u) const { return names_[u]; }
  comm::Communicator& comm() { return *comm_; }
  const std::shared_ptr<comm::Communicator>& comm_ptr() const { return comm_; }
  const ShardOptions& options() const { return options_; }
  bool sharded() const { return options_.strategy != ShardingStrategy::kNoShard; }
  // The CUDA stream (cudaStream_t as an integer) tessera's work follows: the current stream of the parameters'
  // device; 0 on CPU.
  uintptr_t stream() const;
  const shard::StepSchedule* schedule() const { return schedule_.get(); }

  // Every parameter's checkpoint tensor ("<prefix>/<name>"), unit by unit.
  std::vector<CheckpointTensor> CheckpointTensors(const std::string& prefix) const;
  // Every parameter at its full shape, in the parameters' dtype on their device, by name. Collective: every rank
  // calls it. Peak memory: one unit's full parameters on top of the result.
  absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> FullStateDict();

  // The autograd side (called from the hooks; public for the autograd function in sharded.cc).
  void PreBackward(int u);
  void PostBackward(int u);
  void EndOfBackward();

 private:
  absl::StatusOr<int> AddUnit(torch::nn::Module& module, const std::string& prefix);
  // The schedule's index of unit u: the root is the schedule's unit 0, the blocks follow in sharding order.
  int ScheduleIndex(int u) const { return u == root_ ? 0 : u + 1; }

  std::shared_ptr<comm::Communicator> comm_;
  ShardOptions options_;
  std::vector<std::unique_ptr<torch_rt::Unit>> units_;  // blocks in sharding order, then the root
  std::vector<std::vector<std::string>> names_;
  std::unordered_set<const c10::TensorImpl*> managed_;  // parameters some unit holds
  std::unique_ptr<shard::StepSchedule> schedule_;
  int root_ = -1;  // index of the root unit in units_ (the last one added)
  std::optional<at::Device> device_;
};

// A sharded block or root: calling it runs the module's forward through its unit. `Holder` is a libtorch module
// holder (TORCH_MODULE), e.g. TransformerBlock; its forward takes at::Tensor arguments and returns one at::Tensor.
template <class Holder>
class Sharded {
 public:
  Sharded() = default;
  Sharded(ShardedModel* model, int unit, Holder module) : model_(model), unit_(unit), module_(std::move(module)) {}

  template <class... T>
  at::Tensor forward(const T&... inputs) {
    static_assert((std::is_same_v<T, at::Tensor> && ...), "tessera::Sharded: forward takes at::Tensor arguments");
    return model_->RunUnit(unit_, {inputs...}, [this](const std::vector<at::Tensor>& in) {
      return Call(in, std::index_sequence_for<T...>{});
    });
  }
  template <class... T>
  at::Tensor operator()(const T&... inputs) { return forward(inputs...); }

  Holder& module() { return module_; }
  int unit_index() const { return unit_; }

 private:
  template <size_t... I>
  at::Tensor Call(const std::vector<at::Tensor>& in, std::index_sequence<I...>) {
    return module_->forward(in[I]...);
  }

  ShardedModel* model_ = nullptr;
  int unit_ = -1;
  Holder module_;
};

// Shards block `module` as a unit of `model` (see ShardedModel::ShardBlock).
template <class Holder>
absl::StatusOr<Sharded<Holder>> Shard(ShardedModel& model, Holder module, const std::string& name) {
  absl::StatusOr<int> u = model.ShardBlock(*module, name);
  if (!u.ok()) return u.status();
  return Sharded<Holder>(&model, *u, std::move(module));
}

// Shards the root `module` (see ShardedModel::ShardRoot).
template <class Holder>
absl::StatusOr<Sharded<Holder>> ShardRoot(ShardedModel& model, Holder module) {
  absl::StatusOr<int> u = model.ShardRoot(*module);
  if (!u.ok()) return u.status();
  return Sharded<Holder>(&model, *u, std::move(module));
}

}  // namespace tessera
