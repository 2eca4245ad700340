// The step's state machine: when each unit of a model unshards, reshards and reduces its gradients during one
// training step (DESIGN.md section 3). Torch-free: the Python hooks (python/tessera/shard/runtime.py) and the C++
// trainer API report events to it (pre-forward of unit i, post-forward, pre-backward, post-backward, end of
// backward) and it drives the units through the small UnitOps interface, which torch_rt::Unit implements over
// at::Tensor. The hooks only move tensors in and out of the modules.
//
// Per unit it keeps an explicit TrainingState (FSDP2's idea):
//
//   kIdle --pre-forward--> kForward --post-forward--> kIdle --pre-backward--> kPreBackward --post-backward-->
//   kPostBackward --end of backward--> kIdle
//
// and for the root (the unit whose forward runs first and encloses the others) the per-iteration bookkeeping:
// the order units ran forward in (recorded in the first iteration, used for prefetching), whether a backward is
// running, and which units still owe a post-backward at its end.
//
// [Note: every backward pass reduces] A step may run several backward passes (two losses, each .backward()), and a
// unit may run backward more than once per pass (its forward ran twice). Each post-backward hands the unit's
// accumulated unsharded gradients to a reduction; the unit adds every reduction's result into its sharded gradients
// (UnitOps::FinishReduce). The end of each backward pass post-backwards every unit that ran forward with grad
// enabled since the last end of backward, *or* is between pre- and post-backward in this pass: the root has no
// input that requires grad, so nothing else ends its backward, and in a second backward pass its forward is
// already accounted for (without the second condition its gradients stayed on the unsharded parameters and leaked
// into the next step).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tessera::shard {

enum class TrainingState : int8_t { kIdle, kForward, kPreBackward, kPostBackward };

const char* TrainingStateName(TrainingState s);

// What the schedule asks of one unit. Streams are CUDA streams (cudaStream_t as an integer; 0 on CPU).
class UnitOps {
 public:
  virtual ~UnitOps() = default;
  virtual const std::string& unit_name() const = 0;
  // Tells the unit whether the collectives it issues next belong to a forward or a backward pass (for the tags
  // that errors and desync reports show).
  virtual void SetPassForTags(bool backward) {}
  // Whether the unsharded parameters are absent and no all-gather is in flight (a prefetch would issue one).
  virtual bool IsSharded() const = 0;
  virtual absl::Status StartUnshard(uintptr_t stream) = 0;
  virtual absl::Status WaitUnshard(uintptr_t stream) = 0;
  virtual absl::Status Reshard() = 0;
  // Applies requires_grad changes made since the last forward (freezing or unfreezing parameters), or says which
  // parameter cannot change (FailedPrecondition). Called at every pre-forward outside backward.
  virtual absl::Status SyncRequiresGrad() = 0;
  // Whether a post-backward reduces gradients now (gradient sync on, and some parameter requires grad). The same on
  // every rank of the unit's group, so every rank issues the same collectives.
  virtual bool WantsReduce() const = 0;
  // Hands the unsharded gradients to a reduction (finishing one still in flight first) and clears them.
  virtual absl::Status StartReduce(uintptr_t stream) = 0;
  virtual bool Reducing() const = 0;
  // Waits for the reduction in flight (if any) and adds its result into the sharded gradients.
  virtual absl::Status FinishReduce(uintptr_t stream) = 0;
  // Drops what a backward that raised left behind: the reduction in flight (awaited, result discarded) and the
  // unsharded gradients.
  virtual absl::Status DropBackward(uintptr_t stream) = 0;
  // Gradient sync off: a post-backward keeps the unsharded gradients on the unit (local accumulation). See
  // [Note: local gradients belong to .grad] in torch/unit.h. The default keeps nothing to track.
  virtual absl::Status KeepLocalGrads() { return absl::OkStatus(); }
  // Drops the local gradients of every parameter whose sharded .grad the user cleared or replaced since they were
  // kept (zero_grad between accumulation windows). Called before a forward or backward adds to them.
  virtual void DropClearedLocalGrads() {}
};

struct UnitPolicy {
  // Free the unsharded parameters after forward (ZeRO-3). nullopt: decided by `default_reshard_after_forward`,
  // except that the root and the last unit in forward order keep them (their backward comes first).
  std::optional<bool> reshard_after_forward;
  bool default_reshard_after_forward = true;
};

struct PreForwardResult {
  bool recompute_in_backward = false;  // an activation-checkpointing recomputation inside the unit's pre-backward
  bool abandoned_backward = false;     // the previous backward raised; every unit was reset (see AbandonBackward)
};

// Counters of the events seen, for the hook-overhead benchmark.
struct ScheduleCounters {
  int64_t events = 0;
  int64_t prefetches = 0;
};

class StepSchedule {
 public:
  // units[0] is the root. The pointers must outlive the schedule.
  StepSchedule(std::vector<UnitOps*> units, std::vector<UnitPolicy> policies);

  int num_units() const { return static_cast<int>(units_.size()); }
  TrainingState state(int u) const { return slots_[u].state; }
  bool in_backward() const { return in_backward_; }
  bool order_recorded() const { return order_recorded_; }
  const std::vector<int>& forward_order() const { return forward_order_; }
  bool reshard_after_forward(int u) const;
  const ScheduleCounters& counters() const { return counters_; }

  // `in_backward`: autograd is running a backward on this thread (the forward is a checkpointing recomputation).
  absl::StatusOr<PreForwardResult> PreForward(int u, bool in_backward, uintptr_t stream);
  // Returns whether the hooks should put the sharded parameters back on the module (false inside a recomputation
  // that runs between the unit's pre- and post-backward).
  absl::StatusOr<bool> PostForward(int u, bool grad_enabled, bool in_backward);
  // Returns whether this is the first pre-backward of a backward pass: the caller then queues EndOfBackward to run
  // when the autograd engine finishes the pass.
  absl::StatusOr<bool> PreBackward(int u, uintptr_t stream);
  // Idempotent within one backward of the unit.
  absl::Status PostBackward(int u, uintptr_t stream);
  // Returns the units it post-backwarded itself (the caller puts their sharded parameters back).
  absl::StatusOr<std::vector<int>> EndOfBackward(uintptr_t stream);
  // A backward raised before its end: drop what it left behind so the next one starts clean. Every unit ends
  // kIdle and sharded; the first error (if any) is returned after all units were reset.
  absl::Status AbandonBackward(uintptr_t stream);

 private:
  struct Slot {
    TrainingState state = TrainingState::kIdle;
    bool ran_forward = false;        // ran forward with grad enabled since the last end of backward
    bool post_backward_done = false;  // within the current backward of this unit
    int order_pos = -1;              // first position in forward_order_
  };
  int Neighbour(int u, int step) const;
  bool IsLastInForward(int u) const;
  absl::Status Prefetch(int u, uintptr_t stream);
  absl::Status CheckIndex(int u) const;

  std::vector<UnitOps*> units_;
  std::vector<UnitPolicy> policies_;
  std::vector<Slot> slots_;
  std::vector<int> forward_order_;
  bool order_recorded_ = false;
  bool in_backward_ = false;
  ScheduleCounters counters_;
};

}  // namespace tessera::shard
