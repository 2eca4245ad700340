#include "tessera/shard/plan.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace tessera::shard {

absl::StatusOr<ShardPlan> ShardPlan::Create(absl::Span<const int64_t> numels, int world) {
  if (world < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("ShardPlan: world size must be >= 1, got %d", world));
  }
  ShardPlan plan;
  plan.world_ = world;
  plan.slots_.reserve(numels.size());
  int64_t offset = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("ShardPlan: parameter %d has a negative element count %d", i, numels[i]));
    }
    ParamSlot slot;
    slot.numel = numels[i];
    slot.chunk = (numels[i] + world - 1) / world;
    slot.shard_offset = offset;
    offset += slot.chunk;
    plan.slots_.push_back(slot);
  }
  plan.shard_numel_ = offset;
  return plan;
}

int64_t ShardPlan::prefix_shard_numel(int64_t n) const {
  if (n <= 0) return 0;
  if (n >= num_params()) return shard_numel_;
  return slots_[n].shard_offset;
}

std::pair<int64_t, int64_t> ShardPlan::Chunk(int64_t numel, int rank, int world) {
  const int64_t chunk = (numel + world - 1) / world;
  const int64_t start = std::min(numel, static_cast<int64_t>(rank) * chunk);
  return {start, std::clamp<int64_t>(numel - start, 0, chunk)};
}

int64_t ShardPlan::LocalStart(int64_t i, int rank) const {
  return std::min(slots_[i].numel, static_cast<int64_t>(rank) * slots_[i].chunk);
}

int64_t ShardPlan::LocalNumel(int64_t i, int rank) const {
  const ParamSlot& s = slots_[i];
  return std::clamp<int64_t>(s.numel - static_cast<int64_t>(rank) * s.chunk, 0, s.chunk);
}

}  // namespace tessera::shard
