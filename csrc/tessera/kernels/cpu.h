// CPU implementations behind kernels.h. Called by the dispatcher in kernels.cc after it validated counts,
// dtypes and devices, so these assume well-formed input. See kernels.h for the contract of each function.
#pragma once

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "tessera/core/buffer.h"
#include "tessera/kernels/kernels.h"
#include "tessera/shard/plan.h"

namespace tessera::kernels::cpu {

absl::Status CopyIn(absl::Span<const BufferView> params, const shard::ShardPlan& plan, int64_t shard_numel,
                    double scale, BufferView dst, void* stream);
absl::Status CopyOut(BufferView src, const shard::ShardPlan& plan, int64_t shard_numel,
                     absl::Span<const BufferView> params, void* stream);
absl::Status Cast(BufferView src, BufferView dst, void* stream);
absl::Status FusedAdamW(BufferView param, BufferView grad, BufferView exp_avg, BufferView exp_avg_sq,
                        const AdamWConfig& config, void* stream);
absl::Status SquaredNormAccumulate(BufferView x, BufferView out, void* stream);

}  // namespace tessera::kernels::cpu
