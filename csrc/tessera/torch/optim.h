// Optimizer and clipping kernels over at::Tensor, dispatched to kernels/ (CPU or CUDA).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "tessera/kernels/kernels.h"

namespace tessera::torch_rt {

// One fused AdamW step over flat tensors (param, exp_avg, exp_avg_sq: float32/64; grad any float dtype).
absl::Status AdamWStep(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const kernels::AdamWConfig& config, uintptr_t stream = 0);

// sum over tensors of sum(x^2), as a one-element float32 tensor (float64 if any input is float64) on their device.
absl::StatusOr<at::Tensor> SquaredNorm(const std::vector<at::Tensor>& tensors, uintptr_t stream = 0);

}  // namespace tessera::torch_rt
