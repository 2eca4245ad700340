// TrainingState -> CheckpointContents. A file of its own so that programs checkpointing plain CheckpointContents
// (the format tests) do not link the ShardedModel and AdamW.
#include "tessera/api/checkpointer.h"

#include "tessera/core/status.h"

namespace tessera::checkpoint {

absl::StatusOr<CheckpointContents> ContentsOf(const TrainingState& state, bool for_load) {
  if (state.model == nullptr) return absl::InvalidArgumentError("Checkpointer: TrainingState.model is null");
  CheckpointContents c;
  c.model = state.model->CheckpointTensors("model");
  if (optim::AdamW* opt = state.optimizer; opt != nullptr) {
    c.optim = opt->CheckpointTensors("optim", for_load);
    c.optim_json = [opt] { return opt->StateJson(); };
    c.load_optim_json = [opt](const std::string& j) { return opt->LoadStateJson(j); };
  }
  c.train = state.train;
  return c;
}

absl::Status Checkpointer::Save(int64_t step, const TrainingState& state) {
  TESSERA_ASSIGN_OR_RETURN(CheckpointContents c, ContentsOf(state, /*for_load=*/false));
  return Save(step, c);
}

absl::Status Checkpointer::Load(int64_t step, const TrainingState& state) {
  TESSERA_ASSIGN_OR_RETURN(CheckpointContents c, ContentsOf(state, /*for_load=*/true));
  return Load(step, c);
}

absl::StatusOr<std::optional<int64_t>> Checkpointer::LoadLatest(const TrainingState& state) {
  TESSERA_ASSIGN_OR_RETURN(CheckpointContents c, ContentsOf(state, /*for_load=*/true));
  return LoadLatest(c);
}

}  // namespace tessera::checkpoint
