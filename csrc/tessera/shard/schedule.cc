#include "tessera/shard/schedule.h"

#include <utility>

#include "absl/strings/str_format.h"
#include "tessera/core/status.h"

namespace tessera::shard {

const char* TrainingStateName(TrainingState s) {
  switch (s) {
    case TrainingState::kIdle: return "idle";
    case TrainingState::kForward: return "forward";
    case TrainingState::kPreBackward: return "pre_backward";
    case TrainingState::kPostBackward: return "post_backward";
  }
  return "unknown";
}

StepSchedule::StepSchedule(std::vector<UnitOps*> units, std::vector<UnitPolicy> policies)
    : units_(std::move(units)), policies_(std::move(policies)), slots_(units_.size()) {
  TESSERA_CHECK(!units_.empty(), "a step schedule needs at least the root unit");
  TESSERA_CHECK(policies_.size() == units_.size(), "one policy per unit");
}

absl::Status StepSchedule::CheckIndex(int u) const {
  if (u < 0 || u >= num_units()) {
    return absl::InvalidArgumentError(absl::StrFormat("unit index %d out of range [0, %d)", u, num_units()));
  }
  return absl::OkStatus();
}

bool StepSchedule::reshard_after_forward(int u) const {
  const UnitPolicy& p = policies_[u];
  if (p.reshard_after_forward.has_value()) return *p.reshard_after_forward;
  // The root's backward starts right after its forward ends: keep its parameters.
  return u != 0 && p.default_reshard_after_forward;
}

int StepSchedule::Neighbour(int u, int step) const {
  const int k = slots_[u].order_pos;
  if (k < 0) return -1;
  const int j = k + step;
  return j >= 0 && j < static_cast<int>(forward_order_.size()) ? forward_order_[j] : -1;
}

// [Note: last unit keeps its parameters] The last unit to run forward is the first to run backward: freeing its
// parameters would only make pre-backward gather them again at once (torchtitan sets reshard_after_forward=False
// on the last block by hand for the same reason). Applies unless the user chose.
bool StepSchedule::IsLastInForward(int u) const {
  return !policies_[u].reshard_after_forward.has_value() && order_recorded_ && !forward_order_.empty() &&
         forward_order_.back() == u;
}

absl::Status StepSchedule::Prefetch(int u, uintptr_t stream) {
  if (u < 0 || !units_[u]->IsSharded()) return absl::OkStatus();
  ++counters_.prefetches;
  units_[u]->SetPassForTags(in_backward_);
  return units_[u]->StartUnshard(stream);
}

absl::StatusOr<PreForwardResult> StepSchedule::PreForward(int u, bool in_backward, uintptr_t stream) {
  TESSERA_RETURN_IF_ERROR(CheckIndex(u));
  ++counters_.events;
  PreForwardResult result;
  if (u == 0 && in_backward_ && !in_backward) {
    // The last backward never reached its end (it raised): see AbandonBackward.
    TESSERA_RETURN_IF_ERROR(AbandonBackward(stream));
    result.abandoned_backward = true;
  }
  UnitOps& unit = *units_[u];
  unit.SetPassForTags(in_backward);
  Slot& slot = slots_[u];
  if (slot.state == TrainingState::kPreBackward) {
    // [Note: activation checkpointing] Non-reentrant checkpointing recomputes the unit's forward after its
    // pre-backward: the parameters are gathered already and post-backward will reduce and reshard, so the
    // recomputation only needs the full parameters on the module (FSDP2 does the same).
    TESSERA_RETURN_IF_ERROR(unit.WaitUnshard(stream));
    result.recompute_in_backward = true;
    return result;
  }
  if (!in_backward) {
    TESSERA_RETURN_IF_ERROR(unit.SyncRequiresGrad());
    unit.DropClearedLocalGrads();
  }
  if (!order_recorded_) {
    if (slot.order_pos < 0) slot.order_pos = static_cast<int>(forward_order_.size());
    forward_order_.push_back(u);
  }
  slot.state = TrainingState::kForward;
  slot.post_backward_done = false;
  TESSERA_RETURN_IF_ERROR(unit.WaitUnshard(stream));
  // Reentrant checkpointing ran the first forward without grad, so its recomputation (in backward) takes this path
  // but must not prefetch the next unit, whose backward is over.
  if (order_recorded_ && !in_backward) TESSERA_RETURN_IF_ERROR(Prefetch(Neighbour(u, +1), stream));
  return result;
}

absl::StatusOr<bool> StepSchedule::PostForward(int u, bool grad_enabled, bool in_backward) {
  TESSERA_RETURN_IF_ERROR(CheckIndex(u));
  ++counters_.events;
  Slot& slot = slots_[u];
  if (slot.state == TrainingState::kPreBackward) return false;  // see [Note: activation checkpointing]
  const bool reshard =
      !grad_enabled || (reshard_after_forward(u) && !IsLastInForward(u) && !in_backward);
  if (reshard) TESSERA_RETURN_IF_ERROR(units_[u]->Reshard());
  if (grad_enabled) slot.ran_forward = true;
  slot.state = TrainingState::kIdle;
  if (u == 0) order_recorded_ = true;
  return true;
}

absl::StatusOr<bool> StepSchedule::PreBackward(int u, uintptr_t stream) {
  TESSERA_RETURN_IF_ERROR(CheckIndex(u));
  ++counters_.events;
  bool first = false;
  if (!in_backward_) {
    in_backward_ = true;
    first = true;
  }
  Slot& slot = slots_[u];
  // A unit may run backward more than once per step (its forward ran twice): each pass reduces again.
  slot.post_backward_done = false;
  slot.state = TrainingState::kPreBackward;
  units_[u]->SetPassForTags(true);
  units_[u]->DropClearedLocalGrads();  // before autograd adds this backward's gradients to the kept ones
  TESSERA_RETURN_IF_ERROR(units_[u]->WaitUnshard(stream));
  TESSERA_RETURN_IF_ERROR(Prefetch(Neighbour(u, -1), stream));
  return first;
}

absl::Status StepSchedule::PostBackward(int u, uintptr_t stream) {
  TESSERA_RETURN_IF_ERROR(CheckIndex(u));
  ++counters_.events;
  Slot& slot = slots_[u];
  if (slot.post_backward_done) return absl::OkStatus();
  slot.post_backward_done = true;
  slot.state = TrainingState::kPostBackward;
  UnitOps& unit = *units_[u];
  unit.SetPassForTags(true);
  if (unit.WantsReduce()) {
    TESSERA_RETURN_IF_ERROR(unit.StartReduce(stream));
  } else {
    TESSERA_RETURN_IF_ERROR(unit.KeepLocalGrads());
  }
  return unit.Reshard();
}

absl::StatusOr<std::vector<int>> StepSchedule::EndOfBackward(uintptr_t stream) {
  ++counters_.events;
  std::vector<int> finished;
  absl::Status status = [&]() -> absl::Status {
    // See [Note: every backward pass reduces].
    for (int u = 0; u < num_units(); ++u) {
      const Slot& slot = slots_[u];
      if ((slot.ran_forward || slot.state == TrainingState::kPreBackward) && !slot.post_backward_done) {
        TESSERA_RETURN_IF_ERROR(PostBackward(u, stream));
        finished.push_back(u);
      }
    }
    for (int u = 0; u < num_units(); ++u) {
      TESSERA_RETURN_IF_ERROR(units_[u]->FinishReduce(stream));
      TESSERA_RETURN_IF_ERROR(units_[u]->Reshard());
      slots_[u].ran_forward = false;
      slots_[u].state = TrainingState::kIdle;
    }
    return absl::OkStatus();
  }();
  in_backward_ = false;
  if (!status.ok()) return status;
  return finished;
}

absl::Status StepSchedule::AbandonBackward(uintptr_t stream) {
  absl::Status first;
  for (int u = 0; u < num_units(); ++u) {
    // Its result is dropped: the gradients are incomplete. A failure on some ranks only leaves the others blocked
    // in a collective: they time out (or get a desync report) like any group with a rank that stopped.
    absl::Status s = units_[u]->DropBackward(stream);
    if (s.ok()) s = units_[u]->Reshard();
    if (first.ok() && !s.ok()) first = s;
    slots_[u].ran_forward = false;
    slots_[u].post_backward_done = false;
    slots_[u].state = TrainingState::kIdle;
  }
  in_backward_ = false;
  return first;
}

}  // namespace tessera::shard
