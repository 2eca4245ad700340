// Kernels on a unit's flat buffers. Each entry point dispatches on the buffers' device: a CPU reference
// implementation (cpu.cc) and a CUDA one (cuda.cu, queued on `stream`, a cudaStream_t; nullptr = default stream).
// All buffers of one call must be on the same device. Supported dtypes: float32, float64, bfloat16, float16 for
// copies and norms; float32 and float64 for AdamW (master weights and optimizer state are kept in full precision).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "tessera/core/buffer.h"
#include "tessera/shard/plan.h"

namespace tessera::kernels {

// Gradient copy-in: writes every parameter's full gradient into the rank-major flat buffer a reduce-scatter
// consumes. For params[i] (full, plan.slot(i).numel elements, any supported dtype) and every rank r:
//   dst[r*S + off_i + j] = cast(params[i][LocalStart(i, r) + j] * scale)   for j < LocalNumel(i, r)
//   dst[r*S + off_i + j] = 0                                               for the padding up to chunk_i
// where S = `shard_numel` (>= the plan prefix the params cover) and dst has world*S elements.
// `scale` is the pre-divide factor (1/world for an average). Only the first params.size() plan slots are used.
absl::Status CopyIn(absl::Span<const BufferView> params, const shard::ShardPlan& plan, int64_t shard_numel,
                    double scale, BufferView dst, void* stream = nullptr);

// Parameter copy-out: the inverse of CopyIn without scaling. src is an all-gather output (world*S elements,
// rank-major); every params[i] (full tensor) receives its chunks from every rank, cast to its dtype.
absl::Status CopyOut(BufferView src, const shard::ShardPlan& plan, int64_t shard_numel,
                     absl::Span<const BufferView> params, void* stream = nullptr);

// dst = cast(src), elementwise, same count.
absl::Status Cast(BufferView src, BufferView dst, void* stream = nullptr);

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  int64_t step = 1;  // the step being taken, counted from 1 (bias correction)
};

// One AdamW step over a flat shard, the same math as torch.optim.AdamW (amsgrad=False, maximize=False):
//   p -= lr*wd*p;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
//   p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)
// param, exp_avg and exp_avg_sq share one dtype (float32 or float64); grad may be any supported dtype.
absl::Status FusedAdamW(BufferView param, BufferView grad, BufferView exp_avg, BufferView exp_avg_sq,
                        const AdamWConfig& config, void* stream = nullptr);

// out[0] += sum(x^2), accumulated in float32 (float64 when x is float64). `out` is a one-element buffer of
// float32 or float64 on x's device; for CUDA the result stays on the device (no host sync).
absl::Status SquaredNormAccumulate(BufferView x, BufferView out, void* stream = nullptr);

// Whether this build carries the CUDA kernels.
bool CudaKernelsBuilt();

}  // namespace tessera::kernels
