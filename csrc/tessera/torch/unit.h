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
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tessera/comm/communicator.h"
#include "tessera/shard/plan.h"
#include "tessera/shard/schedule.h"
#include "tessera/shard/state.h"

namespace tessera::torch_rt {

struct UnitOptions {
  std::string name = "unit";                   // module path, used in messages
  bool shard = true;                           // false: NO_SHARD (replicated; gradients all-reduced)
  std::optional<at::ScalarType> param_dtype;   // dtype the module computes with (default: the shard's dtype)
  std::optional<at::ScalarType> reduce_dtype;  // dtype gradients are reduced in (default: param_dtype)
  absl::Duration timeout = comm::kDefaultCollectiveTimeout;  // for every collective of this unit
};

// [Note: gradients that no rank produced] A parameter that got no gradient in a step (unused, or not reached by
// the loss) must keep `grad` undefined, so the optimizer leaves it alone (no weight decay, no step count), as in one
// process. Whether *some* rank produced one is a global fact: every rank appends one flag per trainable parameter
// (1 = it has a gradient) to each rank's block of the reduce-scatter input, so the reduction sums them with the
// gradients at no extra collective. A rank reads the summed flags only when it lacks a gradient itself that
// another rank may have (reading them syncs the host with a CUDA stream); otherwise its own gradients say it all.
// [Note: local gradients belong to .grad] With gradient sync off, a post-backward keeps the unsharded gradients on
// the unit (the local accumulation) instead of reducing them; the next backward with sync on reduces what has
// accumulated. In one process those gradients would sit in each parameter's .grad, so whatever clears .grad
// (optimizer.zero_grad(), module.zero_grad(), p.grad = None, zero_grad(set_to_none=False)) must drop them too, or
// a micro-batch the user decided to skip comes back at the next reduction. The unit cannot hook every way of
// clearing .grad, so it makes the clearing visible instead: when it keeps local gradients for a parameter, it
// points the sharded .grad at that parameter's (zeroed, if it had none) gradient view and remembers the tensor and
// its version counter. Before a later forward or backward adds to the kept gradients (and before an optimizer step
// or clipping asks), a sharded .grad that is gone, replaced or written in place means the user cleared it: the
// kept gradient of that parameter is dropped. The views share one version counter (that of flat_grad_shard()), so
// an in-place write to any sharded gradient of the unit during an accumulation window drops the unit's kept
// gradients: zero_grad(set_to_none=False) zeroes them all anyway; scaling gradients mid-window is not supported.
class Unit final : public shard::UnitOps {
 public:
  // `params` are the original full parameters in layout order (the first `num_trainable` require grad), all on
  // one device with one floating dtype; `names` name them in errors.
  static absl::StatusOr<std::unique_ptr<Unit>> Create(std::shared_ptr<comm::Communicator> comm,
                                                      const std::vector<at::Tensor>& params,
                                                      const std::vector<std::string>& names, int64_t num_trainable,
                                                      UnitOptions options);

  const UnitOptions& options() const { return options_; }
  // Renames the unit in messages and collective tags (the runtime names units by module path once the root is
  // known; at creation only the module's class name is).
  void set_name(std::string name) { options_.name = std::move(name); }
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

  // Replaces the views above with the tensors the module really holds (nn.Parameter objects made from those
  // views, same storage), so that requires_grad and .grad read and written here are the module's.
  absl::Status AdoptParams(const std::vector<at::Tensor>& sharded, const std::vector<at::Tensor>& full);
  // Which elements of parameter i (flattened) this rank owns: [start, start + count). From the plan only.
  std::pair<int64_t, int64_t> OwnedRange(int64_t i) const;
  // Which elements of parameter i this rank writes into a checkpoint: what it owns when sharded; when replicated
  // (NO_SHARD) the ranks split the writing, rank r taking chunk r of the group (ShardPlan::Chunk).
  std::pair<int64_t, int64_t> SaveRange(int64_t i) const;
  const std::string& param_name(int64_t i) const { return names_[i]; }
  const std::vector<int64_t>& param_shape(int64_t i) const { return shapes_[i]; }
  int group_rank() const { return group_rank_; }
  int group_size() const { return group_size_; }

  // ---- shard::UnitOps (driven by shard::StepSchedule) ----
  const std::string& unit_name() const override { return options_.name; }
  void SetPassForTags(bool backward) override { backward_pass_ = backward; }
  bool IsSharded() const override { return state_ == shard::UnitState::kSharded; }
  // Issues the all-gather of the shard (cast to param_dtype first). No-op unless sharded.
  absl::Status StartUnshard(uintptr_t stream) override;
  // Waits for it and copies out into full_params(). No-op if already unsharded.
  absl::Status WaitUnshard(uintptr_t stream) override;
  // Frees the unsharded storage (autograd's saved references see it again after the next unshard).
  absl::Status Reshard() override;
  // The sharded parameters' requires_grad is what the user sets between steps (module.parameters() yields them);
  // the unsharded ones, which autograd sees, follow it here. A parameter frozen when the unit was made has no
  // gradient buffer: unfreezing it is a FailedPrecondition naming it.
  absl::Status SyncRequiresGrad() override;
  bool WantsReduce() const override;
  // Copies in the trainable parameters' unsharded gradients (undefined = zero), pre-divided by the group size, with
  // one flag each (see [Note: gradients that no rank produced]); issues the reduce-scatter (all-reduce for NO_SHARD)
  // and clears the unsharded gradients. A reduction still in flight is finished first.
  absl::Status StartReduce(uintptr_t stream) override;
  bool Reducing() const override { return reduce_state_ == shard::ReduceState::kReducing; }
  // Waits for the reduction and adds the result into the sharded parameters' .grad (views of flat_grad_shard()).
  absl::Status FinishReduce(uintptr_t stream) override;
  absl::Status DropBackward(uintptr_t stream) override;
  // See [Note: local gradients belong to .grad].
  absl::Status KeepLocalGrads() override;
  void DropClearedLocalGrads() override;
  // The names of the parameters whose kept local gradients are still waiting for a reduction (after dropping the
  // cleared ones): an optimizer step now would miss them.
  std::vector<std::string> PendingLocalGrads();

  bool requires_grad_sync() const { return requires_grad_sync_; }
  void set_requires_grad_sync(bool on) { requires_grad_sync_ = on; }
  // All-gathers issued so far, and how many of them were freed by Reshard() before any WaitUnshard() used them
  // (a prefetch nobody needed): the runtime's schedule is checked against these.
  int64_t gathers_started() const { return gathers_started_; }
  int64_t gathers_discarded() const { return gathers_discarded_; }

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
  bool requires_grad_sync_ = true;
  bool backward_pass_ = false;  // for collective tags
  at::Tensor reduce_in_, reduce_out_;
  std::vector<char> reduce_local_has_;      // per trainable parameter: this rank handed a gradient to the reduction
  std::vector<char> reduce_requires_grad_;  // per trainable parameter: it required grad when the reduction began
  std::unique_ptr<comm::Work> reduce_work_;

  // Per trainable parameter: the sharded .grad it had when its local gradient was kept (undefined: none kept), and
  // that tensor's version then. See [Note: local gradients belong to .grad].
  struct KeptGrad {
    at::Tensor grad;
    int64_t version = 0;
  };
  std::vector<KeptGrad> kept_;
  bool any_kept_ = false;
};

}  // namespace tessera::torch_rt
