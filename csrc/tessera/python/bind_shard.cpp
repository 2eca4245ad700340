// Python bindings for a sharded unit and the step schedule that drives it (tessera.shard's runtime). The Python
// hooks (python/tessera/shard/runtime.py) report events to the schedule and move tensors in and out of modules.
#include <optional>
#include <tuple>

#include "tessera/python/status_py.h"
#include "tessera/shard/schedule.h"
#include "tessera/torch/unit.h"

namespace py = pybind11;

namespace tessera::python {

void BindShard(py::module_& m) {
  using shard::StepSchedule;
  using torch_rt::Unit;
  py::enum_<shard::UnitState>(m, "UnitState")
      .value("SHARDED", shard::UnitState::kSharded)
      .value("UNSHARDING", shard::UnitState::kUnsharding)
      .value("UNSHARDED", shard::UnitState::kUnsharded);
  py::enum_<shard::TrainingState>(m, "TrainingState")
      .value("IDLE", shard::TrainingState::kIdle)
      .value("FORWARD", shard::TrainingState::kForward)
      .value("PRE_BACKWARD", shard::TrainingState::kPreBackward)
      .value("POST_BACKWARD", shard::TrainingState::kPostBackward);
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
           py::arg("timeout_s") = absl::ToDoubleSeconds(comm::kDefaultCollectiveTimeout))
      .def_property("name", [](const Unit& u) { return u.options().name; }, &Unit::set_name)
      .def_property_readonly("state", &Unit::state)
      .def_property_readonly("num_params", &Unit::num_params)
      .def_property_readonly("num_trainable", &Unit::num_trainable)
      .def_property_readonly("world", [](const Unit& u) { return u.plan().world(); })
      .def_property_readonly("shard_numel", [](const Unit& u) { return u.plan().shard_numel(); })
      .def_property_readonly("trainable_shard_numel", &Unit::trainable_shard_numel)
      .def_property_readonly("full_aliases_shard", &Unit::full_aliases_shard)
      .def_property_readonly("reducing", &Unit::Reducing)
      .def_property("requires_grad_sync", &Unit::requires_grad_sync, &Unit::set_requires_grad_sync)
      .def_property_readonly("group_rank", &Unit::group_rank)
      .def_property_readonly("group_size", &Unit::group_size)
      .def("owned_range", &Unit::OwnedRange, py::arg("i"),
           "(start, count): the elements of parameter i (flattened) this rank owns, from the sharding plan")
      .def("save_range", &Unit::SaveRange, py::arg("i"),
           "(start, count): the elements of parameter i this rank writes into a checkpoint")
      .def("adopt_params",
           [](Unit& u, const std::vector<at::Tensor>& sharded, const std::vector<at::Tensor>& full) {
             ThrowIfError(u.AdoptParams(sharded, full));
           })
      .def("pending_local_grads", &Unit::PendingLocalGrads,
           "Names of the parameters whose locally kept gradients (gradient sync off) await a reduction, after "
           "dropping those whose sharded .grad was cleared ([Note: local gradients belong to .grad], unit.h).")
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
      .def("finish_reduce",
           [](Unit& u, uintptr_t stream) { ThrowIfError(NoGil([&] { return u.FinishReduce(stream); })); },
           py::arg("stream") = 0)
      .def("load_full_param",
           [](Unit& u, int64_t i, const at::Tensor& t) { ThrowIfError(NoGil([&] { return u.LoadFullParam(i, t); })); })
      .def("gather_full", [](Unit& u) { return ValueOrThrow(NoGil([&] { return u.GatherFull(); })); });

  // Every event may wait on a collective: see [Note: never wait on a collective holding the GIL].
  py::class_<StepSchedule>(m, "StepSchedule")
      .def(py::init([](const std::vector<Unit*>& units, const std::vector<std::optional<bool>>& reshard,
                       const std::vector<bool>& default_reshard) {
             if (units.empty() || reshard.size() != units.size() || default_reshard.size() != units.size()) {
               ThrowIfError(absl::InvalidArgumentError("StepSchedule: one reshard policy per unit, root first"));
             }
             std::vector<shard::UnitOps*> ops(units.begin(), units.end());
             std::vector<shard::UnitPolicy> policies(units.size());
             for (size_t i = 0; i < units.size(); ++i) {
               policies[i].reshard_after_forward = reshard[i];
               policies[i].default_reshard_after_forward = default_reshard[i];
             }
             return std::make_unique<StepSchedule>(std::move(ops), std::move(policies));
           }),
           py::arg("units"), py::arg("reshard_after_forward"), py::arg("default_reshard_after_forward"),
           py::keep_alive<1, 2>())
      .def_property_readonly("num_units", &StepSchedule::num_units)
      .def_property_readonly("in_backward", &StepSchedule::in_backward)
      .def_property_readonly("order_recorded", &StepSchedule::order_recorded)
      .def_property_readonly("forward_order", &StepSchedule::forward_order)
      .def_property_readonly("events", [](const StepSchedule& s) { return s.counters().events; })
      .def("state", &StepSchedule::state)
      .def("reshard_after_forward", &StepSchedule::reshard_after_forward)
      .def("pre_forward",
           [](StepSchedule& s, int u, bool in_backward, uintptr_t stream) {
             auto r = ValueOrThrow(NoGil([&] { return s.PreForward(u, in_backward, stream); }));
             return std::make_tuple(r.recompute_in_backward, r.abandoned_backward);
           })
      .def("post_forward",
           [](StepSchedule& s, int u, bool grad_enabled, bool in_backward) {
             return ValueOrThrow(NoGil([&] { return s.PostForward(u, grad_enabled, in_backward); }));
           })
      .def("pre_backward",
           [](StepSchedule& s, int u, uintptr_t stream) {
             return ValueOrThrow(NoGil([&] { return s.PreBackward(u, stream); }));
           })
      .def("post_backward",
           [](StepSchedule& s, int u, uintptr_t stream) {
             ThrowIfError(NoGil([&] { return s.PostBackward(u, stream); }));
           })
      .def("end_of_backward",
           [](StepSchedule& s, uintptr_t stream) {
             return ValueOrThrow(NoGil([&] { return s.EndOfBackward(stream); }));
           })
      .def("abandon_backward", [](StepSchedule& s, uintptr_t stream) {
        ThrowIfError(NoGil([&] { return s.AbandonBackward(stream); }));
      });
}

}  // namespace tessera::python
