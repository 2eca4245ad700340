// The optimizer and gradient clipping of the C++ trainer API, over a ShardedModel's local shards. The same math
// and the same fused kernels as the Python path (python/tessera/optim/adamw.py, python/tessera/shard/clip.py), so
// a C++ and a Python trainer take the same steps.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "tessera/api/checkpoint_tensor.h"
#include "tessera/api/sharded.h"

namespace tessera {
namespace optim {

// torch.optim.AdamW's hyperparameters and defaults.
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

// AdamW (decoupled weight decay, Loshchilov & Hutter 2019; torch.optim.AdamW with amsgrad=False) over every
// trainable parameter of a ShardedModel. State: exp_avg and exp_avg_sq, one flat tensor per unit shaped like the
// unit's trainable shard (same dtype and device), and a step count per parameter. A parameter whose gradient is
// undefined in a step is skipped (no decay, no step count), as torch does.
class AdamW {
 public:
  // InvalidArgument for a negative lr / eps / weight_decay or betas outside [0, 1).
  static absl::StatusOr<std::unique_ptr<AdamW>> Create(ShardedModel& model, AdamWOptions options = {});

  // One step: each run of consecutive parameters of a unit with gradients and equal step counts is one fused
  // kernel call over their span of the flat shard.
  absl::Status Step();
  // Drops every sharded gradient (grad undefined, as zero_grad(set_to_none=True)).
  void ZeroGrad();

  const AdamWOptions& options() const { return options_; }
  void set_lr(double lr) { options_.lr = lr; }
  // Steps taken by parameter i of unit u (0: it never had a gradient).
  int64_t step_count(int u, int64_t i) const { return steps_[u][i]; }

  // Checkpoint tensors "<prefix>/<param name>/exp_avg" and ".../exp_avg_sq", with the parameter's ranges. Saving:
  // only parameters that took a step (as the Python optimizer has no state for the others). Loading
  // (`for_load`): every trainable parameter; the loader fills those the checkpoint has.
  std::vector<CheckpointTensor> CheckpointTensors(const std::string& prefix, bool for_load);
  // The JSON object the Python path saves for a tessera.optim.AdamW (python/tessera/checkpoint/state.py,
  // collect_optimizer): {"groups": [{"hyper": {lr, betas, eps, weight_decay}, "params": [names]}],
  //  "scalars": {name: {"step": steps}}}.
  std::string StateJson() const;
  // Restores hyperparameters and step counts from that object (parameters it does not name get 0 steps; their
  // moments are the zeros the loader left). InvalidArgument if it is not such an object.
  absl::Status LoadStateJson(const std::string& json);

 private:
  AdamW(ShardedModel& model, AdamWOptions options);
  void InitState();

  ShardedModel& model_;
  AdamWOptions options_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;  // per unit: [trainable_shard_numel]
  std::vector<std::vector<int64_t>> steps_;       // per unit, per trainable parameter
};

}  // namespace optim

// Scales the sharded gradients so their global L2 norm is at most `max_norm`, as torch.nn.utils.clip_grad_norm_
// does on the unsharded model (python/tessera/shard/clip.py: float64 sum of squares all-reduced across ranks,
// coefficient min(1, max_norm / (norm + 1e-6)) in float32). Returns the norm before clipping. Collective: every
// rank calls it. InvalidArgument for max_norm <= 0.
absl::StatusOr<double> ClipGradNorm(ShardedModel& model, double max_norm);

}  // namespace tessera
