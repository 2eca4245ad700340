// Validation and device dispatch for kernels.h: one place checks counts, dtypes and devices, so the CPU and CUDA
// implementations can assume well-formed input and report the same errors.
#include "tessera/kernels/kernels.h"

#include "absl/strings/str_format.h"
#include "tessera/core/status.h"
#include "tessera/kernels/cpu.h"
#ifdef TESSERA_WITH_CUDA
#include "tessera/kernels/cuda.h"
#endif

namespace tessera::kernels {
namespace {

absl::Status SameDevice(const char* kernel, const Device& expected, const BufferView& b, const char* what) {
  if (b.device != expected) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %s is on %s but the other buffers are on %s", kernel, what,
                                                      b.device.ToString(), expected.ToString()));
  }
  return absl::OkStatus();
}

absl::Status NotNull(const char* kernel, const BufferView& b, const char* what) {
  if (b.count > 0 && b.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %s is null with %d elements", kernel, what, b.count));
  }
  return absl::OkStatus();
}

absl::Status CheckPlanBuffers(const char* kernel, absl::Span<const BufferView> params, const shard::ShardPlan& plan,
                              int64_t shard_numel, const BufferView& flat, const char* flat_name) {
  if (static_cast<int64_t>(params.size()) > plan.num_params()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %d parameters given but the plan has %d", kernel,
                                                      params.size(), plan.num_params()));
  }
  if (shard_numel < plan.prefix_shard_numel(static_cast<int64_t>(params.size()))) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: shard_numel %d is smaller than the %d elements the first %d parameters occupy", kernel, shard_numel,
        plan.prefix_shard_numel(static_cast<int64_t>(params.size())), params.size()));
  }
  if (flat.count != shard_numel * plan.world()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %s has %d elements, expected world (%d) x shard (%d) = %d",
                                                      kernel, flat_name, flat.count, plan.world(), shard_numel,
                                                      shard_numel * plan.world()));
  }
  TESSERA_RETURN_IF_ERROR(NotNull(kernel, flat, flat_name));
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].count != plan.slot(static_cast<int64_t>(i)).numel) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: parameter %d has %d elements but the plan expects %d",
                                                        kernel, i, params[i].count,
                                                        plan.slot(static_cast<int64_t>(i)).numel));
    }
    TESSERA_RETURN_IF_ERROR(SameDevice(kernel, flat.device, params[i], "a parameter"));
    TESSERA_RETURN_IF_ERROR(NotNull(kernel, params[i], "a parameter"));
  }
  return absl::OkStatus();
}

[[maybe_unused]] absl::Status NoCuda(const char* kernel) {
  return absl::FailedPreconditionError(
      absl::StrFormat("%s: buffers are on CUDA but this build of tessera has no CUDA kernels", kernel));
}

}  // namespace

bool CudaKernelsBuilt() {
#ifdef TESSERA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef TESSERA_WITH_CUDA
#define TESSERA_DISPATCH(kernel, device, ...) \
  return (device).is_cuda() ? cuda::kernel(__VA_ARGS__) : cpu::kernel(__VA_ARGS__)
#else
#define TESSERA_DISPATCH(kernel, device, ...) \
  return (device).is_cuda() ? NoCuda(#kernel) : cpu::kernel(__VA_ARGS__)
#endif

absl::Status CopyIn(absl::Span<const BufferView> params, const shard::ShardPlan& plan, int64_t shard_numel,
                    double scale, BufferView dst, void* stream) {
  TESSERA_RETURN_IF_ERROR(CheckPlanBuffers("CopyIn", params, plan, shard_numel, dst, "the flat output"));
  TESSERA_DISPATCH(CopyIn, dst.device, params, plan, shard_numel, scale, dst, stream);
}

absl::Status CopyOut(BufferView src, const shard::ShardPlan& plan, int64_t shard_numel,
                     absl::Span<const BufferView> params, void* stream) {
  TESSERA_RETURN_IF_ERROR(CheckPlanBuffers("CopyOut", params, plan, shard_numel, src, "the flat input"));
  TESSERA_DISPATCH(CopyOut, src.device, src, plan, shard_numel, params, stream);
}

absl::Status Cast(BufferView src, BufferView dst, void* stream) {
  if (src.count != dst.count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Cast: source has %d elements but destination has %d", src.count, dst.count));
  }
  TESSERA_RETURN_IF_ERROR(SameDevice("Cast", src.device, dst, "the destination"));
  TESSERA_RETURN_IF_ERROR(NotNull("Cast", src, "the source"));
  TESSERA_RETURN_IF_ERROR(NotNull("Cast", dst, "the destination"));
  TESSERA_DISPATCH(Cast, src.device, src, dst, stream);
}

absl::Status FusedAdamW(BufferView param, BufferView grad, BufferView exp_avg, BufferView exp_avg_sq,
                        const AdamWConfig& config, void* stream) {
  if (param.dtype != DType::kFloat32 && param.dtype != DType::kFloat64) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "FusedAdamW: parameters must be float32 or float64 (master weights), got %s", DTypeName(param.dtype)));
  }
  if (exp_avg.dtype != param.dtype || exp_avg_sq.dtype != param.dtype) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "FusedAdamW: optimizer state dtypes (%s, %s) must match the parameter dtype %s", DTypeName(exp_avg.dtype),
        DTypeName(exp_avg_sq.dtype), DTypeName(param.dtype)));
  }
  for (const auto& [b, name] : {std::pair{grad, "grad"}, {exp_avg, "exp_avg"}, {exp_avg_sq, "exp_avg_sq"}}) {
    if (b.count != param.count) {
      return absl::InvalidArgumentError(absl::StrFormat("FusedAdamW: %s has %d elements but the parameter has %d",
                                                        name, b.count, param.count));
    }
    TESSERA_RETURN_IF_ERROR(SameDevice("FusedAdamW", param.device, b, name));
    TESSERA_RETURN_IF_ERROR(NotNull("FusedAdamW", b, name));
  }
  TESSERA_RETURN_IF_ERROR(NotNull("FusedAdamW", param, "param"));
  if (config.step < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("FusedAdamW: step must be >= 1, got %d", config.step));
  }
  if (!(config.lr >= 0) || !(config.eps >= 0) || !(config.beta1 >= 0 && config.beta1 < 1) ||
      !(config.beta2 >= 0 && config.beta2 < 1) || !(config.weight_decay >= 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "FusedAdamW: invalid hyperparameters lr=%g betas=(%g, %g) eps=%g weight_decay=%g; expected lr, eps, "
        "weight_decay >= 0 and betas in [0, 1)",
        config.lr, config.beta1, config.beta2, config.eps, config.weight_decay));
  }
  TESSERA_DISPATCH(FusedAdamW, param.device, param, grad, exp_avg, exp_avg_sq, config, stream);
}

absl::Status SquaredNormAccumulate(BufferView x, BufferView out, void* stream) {
  if (out.count != 1 || (out.dtype != DType::kFloat32 && out.dtype != DType::kFloat64)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SquaredNormAccumulate: output must be one float32 or float64 element, got %d x %s", out.count,
        DTypeName(out.dtype)));
  }
  TESSERA_RETURN_IF_ERROR(SameDevice("SquaredNormAccumulate", x.device, out, "the output"));
  TESSERA_RETURN_IF_ERROR(NotNull("SquaredNormAccumulate", x, "the input"));
  TESSERA_RETURN_IF_ERROR(NotNull("SquaredNormAccumulate", out, "the output"));
  TESSERA_DISPATCH(SquaredNormAccumulate, x.device, x, out, stream);
}

}  // namespace tessera::kernels
