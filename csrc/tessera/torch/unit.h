// A sharded unit over at::Tensor: the flat shard of a group of parameters, the unsharded parameters the module
// computes with, and the paired issue/wait calls of DESIGN.md section 3 (all-gather + copy-out before compute,
// copy-in + reduce-scatter after backward). The Python hooks decide *when*; this class does the work.
//
// Layout: parameters are ordered trainable first, then frozen, so gradients occupy a prefix of the shard
// (`trainable_shard_numel()`), and the optimizer and the reduce-scatter touch only that prefix.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tessera/comm/communicator.h"
#include "tessera/shard/plan.h"
#include "tessera/shard/state.h"

namespace tessera::torch_rt {

struct UnitOptions {
  std::string name = "unit";                   // module path, used in messages
  bool shard = true;                           // false: NO_SHARD (replicated; gradients all-reduced)
  std::optional<at::ScalarType> param_dtype;   // dtype the module computes with (default: the shard's dtype)
  std::optional<at::ScalarType> reduce_dtype;  // dtype gradients are reduced in (default: param_dtype)
  absl::Duration timeout = absl::Minutes(10);  // for every collective of this unit
};

class Unit {
 public:
  // `params` are the original full parameters in layout order (the first `num_trainable` require grad), all on
  // one device with one floating dtype; `names` name them in errors.
  static absl::StatusOr<std::unique_ptr<Unit>> Create(std::shared_ptr<comm::Communicator> comm,
                                                      const std::vector<at::Tensor>& params,
                                                      const std::vector<std::string>& names, int64_t num_trainable,
                                                      UnitOptions options);

  const UnitOptions& options() const { return options_; }
  const shard::ShardPlan& plan() const { return plan_; }
  shard::UnitState state() const { return state_; }
  int64_t num_params() const { return plan_.num_params(); }
  int64_t num_trainable() const { return num_trainable_; }
  int64_t trainable_shard_numel() const { return plan_.prefix_shard_numel(num_trainable_); }

  // 1-D views into the flat shard: what this rank owns of each parameter (no padding).
  const std::vector<at::Tensor>& sharded_params() const { return sharded_params_; }
  // 1-D views into the flat gradient shard, one per trainable parameter.
  const std::vector<at::Tensor>& sharded_grads() const { return sharded_grads_; }
  // Views (original shapes) into the unsharded buffer; their storage is empty while sharded.
  const std::vector<at::Tensor>& full_params() const { return full_params_; }
  const at::Tensor& flat_shard() const { return flat_shard_; }
  const at::Tensor& flat_grad_shard() const { return flat_grad_shard_; }
  // Whether the unsharded parameters alias the shard (one rank or NO_SHARD without a cast): nothing to gather.
  bool full_aliases_shard() const { return full_aliases_shard_; }

  // Issues the all-gather of the shard (cast to param_dtype first). No-op unless sharded.
  absl::Status StartUnshard(uintptr_t stream = 0);
  // Waits for it and copies out into full_params(). No-op if already unsharded.
  absl::Status WaitUnshard(uintptr_t stream = 0);
  // Frees the unsharded storage (autograd's saved references see it again after the next unshard).
  absl::Status Reshard();
  // All-gathers issued so far, and how many of them were freed by Reshard() before any WaitUnshard() used them
  // (a prefetch nobody needed): the runtime's schedule is checked against these.
  int64_t gathers_started() const { return gathers_started_; }
  int64_t gathers_discarded() const { return gathers_discarded_; }

  // Copies in the trainable parameters' full gradients (undefined = zero), pre-divided by the group size, and
  // issues the reduce-scatter (all-reduce for NO_SHARD).
  absl::Status StartReduce(const std::vector<at::Tensor>& grads, uintptr_t stream = 0);
  // Waits for it; returns this rank's reduced flat gradient (trainable_shard_numel() elements, reduce dtype).
  absl::StatusOr<at::Tensor> WaitReduce(uintptr_t stream = 0);
  bool reducing() const { return reduce_state_ == shard::ReduceState::kReducing; }

  // Copies a full tensor's local chunk into the shard of parameter i (loading a full state dict).
  absl::Status LoadFullParam(int64_t i, const at::Tensor& full);
  // Gathers every parameter's full value in the shard's dtype (collective: every rank of the group calls it).
  absl::StatusOr<std::vector<at::Tensor>> GatherFull();

 private:
  Unit() = default;
  comm::CollectiveOptions CollOpts(uintptr_t stream) const;

  std::shared_ptr<comm::Communicator> comm_;
  UnitOptions options_;
  shard::ShardPlan plan_;
  int64_t num_trainable_ = 0;
  int group_rank_ = 0;
  int group_size_ = 1;
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> shapes_;
  at::ScalarType param_dtype_ = at::kFloat;
  at::ScalarType reduce_dtype_ = at::kFloat;
  bool full_aliases_shard_ = false;
  int64_t full_nbytes_ = 0;

  at::Tensor flat_shard_;       // this rank's shard, storage dtype
  at::Tensor flat_grad_shard_;  // gradient shard of the trainable prefix, storage dtype
  at::Tensor full_flat_;        // unsharded parameters, param dtype, param-major; storage freed while sharded
  std::vector<at::Tensor> sharded_params_, sharded_grads_, full_params_;

  shard::UnitState state_ = shard::UnitState::kSharded;
  int64_t gathers_started_ = 0;
  int64_t gathers_discarded_ = 0;
  at::Tensor gather_in_, gather_out_;
  std::unique_ptr<comm::Work> gather_work_;

  shard::ReduceState reduce_state_ = shard::ReduceState::kIdle;
  at::Tensor reduce_in_, reduce_out_;
  std::unique_ptr<comm::Work> reduce_work_;
};

}  // namespace tessera::torch_rt
