#include "tessera/torch/tensor_view.h"

#include "absl/strings/str_format.h"

namespace tessera::torch_rt {

absl::StatusOr<DType> ToDType(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "dtype %s is not supported; expected float32, float64, bfloat16 or float16", c10::toString(t)));
  }
}

at::ScalarType ToScalarType(DType t) {
  switch (t) {
    case DType::kFloat32: return at::kFloat;
    case DType::kFloat64: return at::kDouble;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kFloat16: return at::kHalf;
  }
  return at::kFloat;
}

absl::StatusOr<BufferView> ViewOf(const at::Tensor& t, const std::string& what) {
  if (!t.defined()) return absl::InvalidArgumentError(absl::StrFormat("%s: tensor is undefined", what));
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: expected a contiguous tensor", what));
  }
  auto dtype = ToDType(t.scalar_type());
  if (!dtype.ok()) return absl::InvalidArgumentError(absl::StrFormat("%s: %s", what, dtype.status().message()));
  BufferView v;
  v.data = t.data_ptr();
  v.dtype = *dtype;
  v.count = t.numel();
  if (t.is_cuda()) {
    v.device = Device::CUDA(t.get_device());
  } else if (t.is_cpu()) {
    v.device = Device::CPU();
  } else {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensors on %s are not supported; expected cpu or cuda", what, t.device().str()));
  }
  return v;
}

at::Tensor TensorFromView(const BufferView& view) {
  auto options = at::TensorOptions().dtype(ToScalarType(view.dtype));
  options = view.device.is_cuda() ? options.device(at::kCUDA, view.device.index) : options.device(at::kCPU);
  return at::from_blob(view.data, {view.count}, options);
}

}  // namespace tessera::torch_rt
