// The sharding plan of one unit: which slice of each parameter each rank owns, and where it lives in the flat
// shard. Every parameter is split along its flattened elements into `world` chunks of ceil(numel / world); chunk r
// belongs to rank r, so rank r's flat shard is [chunk_r(p0) | chunk_r(p1) | ...] with each chunk padded to the same
// length on every rank. The all-gather output is then rank-major: rank r's shard at [r*S, (r+1)*S).
// Padding stays internal: LocalNumel() is what a rank really owns (possibly 0 for tiny parameters at high ranks).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tessera::shard {

struct ParamSlot {
  int64_t numel = 0;         // elements of the full parameter
  int64_t chunk = 0;         // padded elements per rank, ceil(numel / world)
  int64_t shard_offset = 0;  // where this parameter's chunk starts inside every rank's flat shard
};

class ShardPlan {
 public:
  // `numels`: element counts of the unit's parameters in layout order; `world` >= 1 ranks.
  static absl::StatusOr<ShardPlan> Create(absl::Span<const int64_t> numels, int world);

  int world() const { return world_; }
  int64_t num_params() const { return static_cast<int64_t>(slots_.size()); }
  const ParamSlot& slot(int64_t i) const { return slots_[i]; }
  // Padded elements in each rank's flat shard (the same on every rank).
  int64_t shard_numel() const { return shard_numel_; }
  // Padded elements in the shard occupied by the first `n` parameters (a layout prefix).
  int64_t prefix_shard_numel(int64_t n) const;
  // Unpadded elements of parameter i that rank r owns, and where they start in the flattened parameter.
  int64_t LocalNumel(int64_t i, int rank) const;
  int64_t LocalStart(int64_t i, int rank) const;
  // The same split for one tensor of `numel` elements over `world` ranks: (start, count) of rank r's chunk.
  static std::pair<int64_t, int64_t> Chunk(int64_t numel, int rank, int world);

 private:
  int world_ = 1;
  int64_t shard_numel_ = 0;
  std::vector<ParamSlot> slots_;
};

}  // namespace tessera::shard
