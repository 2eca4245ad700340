#include "tessera/torch/optim.h"

#include "absl/strings/str_format.h"
#include "tessera/core/status.h"
#include "tessera/torch/tensor_view.h"

namespace tessera::torch_rt {

absl::Status AdamWStep(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const kernels::AdamWConfig& config, uintptr_t stream) {
  TESSERA_ASSIGN_OR_RETURN(BufferView p, ViewOf(param, "AdamW parameter"));
  TESSERA_ASSIGN_OR_RETURN(BufferView g, ViewOf(grad, "AdamW gradient"));
  TESSERA_ASSIGN_OR_RETURN(BufferView m, ViewOf(exp_avg, "AdamW exp_avg"));
  TESSERA_ASSIGN_OR_RETURN(BufferView v, ViewOf(exp_avg_sq, "AdamW exp_avg_sq"));
  return kernels::FusedAdamW(p, g, m, v, config, reinterpret_cast<void*>(stream));
}

absl::StatusOr<at::Tensor> SquaredNorm(const std::vector<at::Tensor>& tensors, uintptr_t stream) {
  if (tensors.empty()) return at::zeros({1}, at::kFloat);
  bool f64 = false;
  for (const auto& t : tensors) f64 = f64 || t.scalar_type() == at::kDouble;
  at::Tensor out = at::zeros({1}, tensors[0].options().dtype(f64 ? at::kDouble : at::kFloat));
  TESSERA_ASSIGN_OR_RETURN(BufferView o, ViewOf(out, "norm output"));
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i].contiguous();
    TESSERA_ASSIGN_OR_RETURN(BufferView x, ViewOf(t, absl::StrFormat("tensor %d", i)));
    TESSERA_RETURN_IF_ERROR(kernels::SquaredNormAccumulate(x, o, reinterpret_cast<void*>(stream)));
  }
  return out;
}

}  // namespace tessera::torch_rt
