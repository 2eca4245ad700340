// at::Tensor <-> core::BufferView, the seam between torch and tessera's torch-free layers.
#pragma once

#include <string>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "tessera/core/buffer.h"

namespace tessera::torch_rt {

absl::StatusOr<DType> ToDType(at::ScalarType t);
at::ScalarType ToScalarType(DType t);

// A view of a contiguous tensor of a supported floating dtype; `what` names it in errors.
absl::StatusOr<BufferView> ViewOf(const at::Tensor& t, const std::string& what);

// A tensor aliasing `view`'s memory (no copy, no ownership).
at::Tensor TensorFromView(const BufferView& view);

}  // namespace tessera::torch_rt
