// Python bindings for the optimizer and norm kernels (tessera.optim.AdamW, tessera.clip_grad_norm_).
#include "tessera/python/status_py.h"
#include "tessera/torch/optim.h"

namespace py = pybind11;

namespace tessera::python {

void BindKernels(py::module_& m) {
  m.def("adamw_step",
        [](const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
           double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step, uintptr_t stream) {
          kernels::AdamWConfig c{lr, beta1, beta2, eps, weight_decay, step};
          ThrowIfError(torch_rt::AdamWStep(param, grad, exp_avg, exp_avg_sq, c, stream));
        },
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::arg("stream") = 0);
  m.def("squared_norm",
        [](const std::vector<at::Tensor>& tensors, uintptr_t stream) {
          return ValueOrThrow(torch_rt::SquaredNorm(tensors, stream));
        },
        py::arg("tensors"), py::arg("stream") = 0);
}

}  // namespace tessera::python
