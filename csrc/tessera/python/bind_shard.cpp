// Python bindings for a sharded unit (tessera.shard's runtime); the hooks that drive it live in Python.
#include <optional>

#include "tessera/python/status_py.h"
#include "tessera/torch/unit.h"

namespace py = pybind11;

namespace tessera::python {

void BindShard(py::module_& m) {
  using torch_rt::Unit;
  py::class_<Unit>(m, "Unit")
      .def(py::init([](std::shared_ptr<comm::Communicator> comm, const std::vector<at::Tensor>& params,
                       const std::vector<std::string>& names, int64_t num_trainable, const std::string& name,
                       bool shard, std::optional<at::ScalarType> param_dtype,
                       std::optional<at::ScalarType> reduce_dtype, double timeout_s) {
             torch_rt::UnitOptions o;
             o.name = name;
             o.shard = shard;
             o.param_dtype = param_dtype;
             o.reduce_dtype = reduce_dtype;
             o.timeout = absl::Seconds(timeout_s);
             return ValueOrThrow(Unit::Create(std::move(comm), params, names, num_trainable, o));
           }),
           py::arg("comm"), py::arg("params"), py::arg("names"), py::arg("num_trainable"), py::arg("name"),
           py::arg("shard") = true, py::arg("param_dtype") = std::nullopt, py::arg("reduce_dtype") = std::nullopt,
           py::arg("timeout_s") = 600.0)
      .def_property_readonly("name", [](const Unit& u) { return u.options().name; })
      .def_property_readonly("state", [](const Unit& u) { return std::string(shard::UnitStateName(u.state())); })
      .def_property_readonly("num_params", &Unit::num_params)
      .def_property_readonly("num_trainable", &Unit::num_trainable)
      .def_property_readonly("world", [](const Unit& u) { return u.plan().world(); })
      .def_property_readonly("shard_numel", [](const Unit& u) { return u.plan().shard_numel(); })
      .def_property_readonly("trainable_shard_numel", &Unit::trainable_shard_numel)
      .def_property_readonly("full_aliases_shard", &Unit::full_aliases_shard)
      .def_property_readonly("reducing", &Unit::reducing)
      .def_property_readonly("gathers_started", &Unit::gathers_started)
      .def_property_readonly("gathers_discarded", &Unit::gathers_discarded)
      .def_property_readonly("sharded_params", &Unit::sharded_params)
      .def_property_readonly("sharded_grads", &Unit::sharded_grads)
      .def_property_readonly("full_params", &Unit::full_params)
      .def_property_readonly("flat_shard", &Unit::flat_shard)
      .def_property_readonly("flat_grad_shard", &Unit::flat_grad_shard)
      .def("shard_offset", [](const Unit& u, int64_t i) { return u.plan().slot(i).shard_offset; })
      // Each of these may wait for a collective: see [Note: never wait on a collective holding the GIL].
      .def("start_unshard",
           [](Unit& u, uintptr_t stream) { ThrowIfError(NoGil([&] { return u.StartUnshard(stream); })); },
           py::arg("stream") = 0)
      .def("wait_unshard",
           [](Unit& u, uintptr_t stream) { ThrowIfError(NoGil([&] { return u.WaitUnshard(stream); })); },
           py::arg("stream") = 0)
      .def("reshard", [](Unit& u) { ThrowIfError(NoGil([&] { return u.Reshard(); })); })
      .def("start_reduce",
           [](Unit& u, const std::vector<std::optional<at::Tensor>>& grads, uintptr_t stream) {
             std::vector<at::Tensor> g;
             g.reserve(grads.size());
             for (const auto& t : grads) g.push_back(t.has_value() ? *t : at::Tensor());
             ThrowIfError(NoGil([&] { return u.StartReduce(g, stream); }));
           },
           py::arg("grads"), py::arg("stream") = 0)
      .def("wait_reduce",
           [](Unit& u, uintptr_t stream) { return ValueOrThrow(NoGil([&] { return u.WaitReduce(stream); })); },
           py::arg("stream") = 0)
      .def("load_full_param",
           [](Unit& u, int64_t i, const at::Tensor& t) { ThrowIfError(NoGil([&] { return u.LoadFullParam(i, t); })); })
      .def("gather_full", [](Unit& u) { return ValueOrThrow(NoGil([&] { return u.GatherFull(); })); });
}

}  // namespace tessera::python
