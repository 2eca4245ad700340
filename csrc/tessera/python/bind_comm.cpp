// Python bindings for communicators: the c10d ProcessGroup adapter, tessera's NCCL communicator, and tensor-level
// collectives on any of them (used by clipping, state dicts and the Python conformance tests).
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cmath>
#include <limits>

#include "absl/strings/str_format.h"
#include "tessera/comm/pg/c10d_store.h"
#include "tessera/comm/pg/pg_communicator.h"
#include "tessera/kernels/kernels.h"
#include "tessera/python/status_py.h"
#include "tessera/torch/tensor_view.h"
#ifdef TESSERA_WITH_CUDA
#include "tessera/comm/nccl/nccl_communicator.h"
#endif

namespace py = pybind11;

namespace tessera::python {
namespace {

comm::CollectiveOptions Opts(double timeout_s, uintptr_t stream) {
  comm::CollectiveOptions o;
  o.timeout = absl::Seconds(timeout_s);
  o.stream = reinterpret_cast<void*>(stream);
  return o;
}

comm::ReduceOp ParseOp(const std::string& op) {
  if (op == "sum") return comm::ReduceOp::kSum;
  if (op == "avg") return comm::ReduceOp::kAvg;
  ThrowIfError(absl::InvalidArgumentError("reduce op '" + op + "' is not supported; expected 'sum' or 'avg'"));
  return comm::ReduceOp::kSum;
}

// Runs one collective to completion with the GIL released (other Python threads keep running meanwhile).
void RunAndWait(comm::Communicator& c, const comm::Collective& op, double timeout_s, uintptr_t stream) {
  absl::Status status;
  {
    py::gil_scoped_release release;
    auto work = c.Issue(absl::MakeConstSpan(&op, 1), Opts(timeout_s, stream));
    status = work.ok() ? (*work)->Wait() : work.status();
  }
  ThrowIfError(status);
}

BufferView View(const at::Tensor& t, const char* what) { return ValueOrThrow(torch_rt::ViewOf(t, what)); }

const double kDefaultTimeoutS = absl::ToDoubleSeconds(comm::kDefaultCollectiveTimeout);

}  // namespace

void BindComm(py::module_& m) {
  py::class_<comm::Communicator, std::shared_ptr<comm::Communicator>>(m, "Communicator")
      .def_property_readonly("rank", &comm::Communicator::rank)
      .def_property_readonly("size", &comm::Communicator::size)
      .def_property_readonly("backend_name", &comm::Communicator::backend_name)
      .def_property("step", &comm::Communicator::step, &comm::Communicator::set_step,
                    "The training step named in this communicator's timeout and error messages (-1: none).")
      .def_property(
          "timeout_cap_s",
          [](const comm::Communicator& c) {
            const absl::Duration cap = c.timeout_cap();
            return cap >= absl::Hours(24 * 365 * 100) ? std::numeric_limits<double>::infinity()
                                                      : absl::ToDoubleSeconds(cap);
          },
          [](comm::Communicator& c, double seconds) {
            if (!(seconds > 0)) {
              ThrowIfError(absl::InvalidArgumentError(absl::StrFormat(
                  "timeout_cap_s must be > 0 seconds (inf: no cap), got %g", seconds)));
            }
            c.set_timeout_cap(std::isinf(seconds) ? absl::InfiniteDuration() : absl::Seconds(seconds));
          },
          "A bound in seconds on every collective from now on, on top of each call's own timeout (the smaller "
          "wins; inf: none). Tightened after the first step so a hung peer ends the job in seconds.")
      .def("barrier",
           [](comm::Communicator& c, double timeout_s) {
             absl::Status s;
             {
               py::gil_scoped_release release;
               s = c.Barrier(absl::Seconds(timeout_s));
             }
             ThrowIfError(s);
           },
           py::arg("timeout_s") = kDefaultTimeoutS)
      .def("all_gather_into",
           [](comm::Communicator& c, const at::Tensor& out, const at::Tensor& in, double timeout_s,
              uintptr_t stream) {
             RunAndWait(c, comm::Collective::AllGather(View(in, "all_gather input"), View(out, "all_gather output")),
                        timeout_s, stream);
           },
           py::arg("output"), py::arg("input"), py::arg("timeout_s") = kDefaultTimeoutS, py::arg("stream") = 0)
      .def("reduce_scatter_into",
           [](comm::Communicator& c, const at::Tensor& out, const at::Tensor& in, const std::string& op,
              double timeout_s, uintptr_t stream) {
             RunAndWait(c,
                        comm::Collective::ReduceScatter(View(in, "reduce_scatter input"),
                                                        View(out, "reduce_scatter output"), ParseOp(op)),
                        timeout_s, stream);
           },
           py::arg("output"), py::arg("input"), py::arg("op") = "sum", py::arg("timeout_s") = kDefaultTimeoutS,
           py::arg("stream") = 0)
      .def("all_reduce_",
           [](comm::Communicator& c, const at::Tensor& t, const std::string& op, double timeout_s, uintptr_t stream) {
             RunAndWait(c, comm::Collective::AllReduce(View(t, "all_reduce buffer"), ParseOp(op)), timeout_s, stream);
           },
           py::arg("tensor"), py::arg("op") = "sum", py::arg("timeout_s") = kDefaultTimeoutS, py::arg("stream") = 0)
      .def("broadcast_",
           [](comm::Communicator& c, const at::Tensor& t, int root, double timeout_s, uintptr_t stream) {
             RunAndWait(c, comm::Collective::Broadcast(View(t, "broadcast buffer"), root), timeout_s, stream);
           },
           py::arg("tensor"), py::arg("root") = 0, py::arg("timeout_s") = kDefaultTimeoutS, py::arg("stream") = 0);

  m.def("pg_communicator",
        [](const c10::intrusive_ptr<c10d::ProcessGroup>& group, py::object store, const std::string& key_prefix,
           double first_deadline_s, bool strict, py::object user_group,
           bool headers) -> std::shared_ptr<comm::Communicator> {
          if (store.is_none()) {
            if (strict) {
              ThrowIfError(absl::InvalidArgumentError("pg_communicator: strict=True needs store= (a c10d Store)"));
            }
            auto c = std::make_shared<comm::PgCommunicator>(group);
            c->set_exchange_headers(headers);
            return c;
          }
          comm::DesyncOptions desync;
          desync.store = std::make_shared<comm::C10dStore>(store.cast<c10::intrusive_ptr<c10d::Store>>());
          desync.key_prefix = key_prefix;
          desync.first_deadline = absl::Seconds(first_deadline_s);
          desync.strict = strict;
          c10::intrusive_ptr<c10d::ProcessGroup> user;
          if (!user_group.is_none()) user = user_group.cast<c10::intrusive_ptr<c10d::ProcessGroup>>();
          // Create() writes this rank's first note to the store: no GIL needed, none held.
          auto made = NoGil([&] { return comm::PgCommunicator::Create(group, std::move(desync), user); });
          std::unique_ptr<comm::PgCommunicator> c = ValueOrThrow(std::move(made));
          c->set_exchange_headers(headers);
          return std::shared_ptr<comm::Communicator>(std::move(c));
        },
        py::arg("group"), py::arg("store") = py::none(), py::arg("key_prefix") = "",
        py::arg("first_deadline_s") = absl::ToDoubleSeconds(comm::kDefaultDesyncFirstDeadline),
        py::arg("strict") = false, py::arg("user_group") = py::none(), py::arg("headers") = true,
        "A tessera Communicator over a torch.distributed ProcessGroup (gloo for CPU ranks). Every collective is "
        "preceded by a 16-byte header all-gather, so ranks at different collectives raise tessera.DesyncError "
        "instead of having gloo pair them. With `store` (a c10d Store every rank of the group reaches) and "
        "`key_prefix` (unique to this communicator, the same on every rank), a wait longer than `first_deadline_s` "
        "compares positions with the other ranks, and the error names every rank's position; `strict` compares "
        "every collective before it runs. `user_group`: when `group` is tessera's own group, the group the user's "
        "own collectives run on (a peer blocked in one of those is then found within seconds). `headers=False` only "
        "measures what the header costs (benchmarks/desync_header.py). See "
        "csrc/tessera/comm/pg/pg_communicator.h and desync.h.");

  m.def("cuda_built", &kernels::CudaKernelsBuilt, "Whether this build has the CUDA kernels and NCCL backend.");

#ifdef TESSERA_WITH_CUDA
  m.def("nccl_unique_id", []() { return py::bytes(ValueOrThrow(comm::NcclCommunicator::NewUniqueId())); });
  m.def("nccl_communicator",
        [](int rank, int size, const py::bytes& unique_id, int device,
           double init_timeout_s) -> std::shared_ptr<comm::Communicator> {
          std::string id = unique_id;
          std::unique_ptr<comm::NcclCommunicator> c;
          absl::Status status;
          {
            py::gil_scoped_release release;
            auto made = comm::NcclCommunicator::Create(rank, size, id, device, absl::Seconds(init_timeout_s));
            status = made.status();
            if (made.ok()) c = std::move(made).value();
          }
          ThrowIfError(status);
          return std::shared_ptr<comm::Communicator>(std::move(c));
        },
        py::arg("rank"), py::arg("size"), py::arg("unique_id"), py::arg("device"), py::arg("init_timeout_s") = 600.0,
        "tessera's NCCL communicator: rank `rank` of `size` on CUDA device `device`; every rank must join within "
        "`init_timeout_s` seconds (tessera.CommTimeoutError otherwise). Each issued collective is watched against "
        "its deadline by a watchdog thread that aborts the communicator on a miss (csrc/tessera/comm/watchdog.h).");
#endif
}

}  // namespace tessera::python
