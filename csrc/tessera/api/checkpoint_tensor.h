// One logical tensor of a checkpoint as one rank sees it: what the model (api/sharded.h) and the optimizer
// (api/adamw.h) hand to the C++ Checkpointer (api/checkpointer.h). The same mapping as the Python path's
// python/tessera/checkpoint/state.py (Slot / ParamPlace), so both write and read one format
// (docs/checkpoint_format.md): each rank saves its range of the flattened full tensor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace tessera {

struct CheckpointTensor {
  std::string name;            // "model/layers.0.attention.wq.weight", "optim/layers.0.attention.wq.weight/exp_avg"
  std::vector<int64_t> shape;  // the full (unsharded) shape
  // 1-D, contiguous, on the training device: the elements this rank holds. Sharded: its own range of the flattened
  // full tensor (no padding); replicated (NO_SHARD, or a world of one): all of it.
  at::Tensor local;
  // Saving: local[save_offset, save_offset + save_count) are elements [save_start, save_start + save_count) of the
  // flattened full tensor. Across ranks the saved ranges cover the tensor exactly once.
  int64_t save_offset = 0;
  int64_t save_start = 0;
  int64_t save_count = 0;
  // Loading: elements [load_start, load_start + local.numel()) of the flattened full tensor go into local.
  int64_t load_start = 0;
};

}  // namespace tessera
