// Python bindings for the checkpoint engine (tessera.checkpoint's Checkpointer drives them).
#include <optional>
#include <tuple>

#include "absl/strings/str_format.h"

#include "tessera/checkpoint/reader.h"
#include "tessera/checkpoint/writer.h"
#include "tessera/python/status_py.h"
#include "tessera/torch/tensor_view.h"

namespace py = pybind11;

namespace tessera::python {
namespace {

using checkpoint::CheckpointReader;
using checkpoint::CheckpointWriter;
using checkpoint::SaveHandle;

// A save in flight and the tensors it reads from, kept alive until every piece is staged.
struct PySaveHandle {
  std::shared_ptr<SaveHandle> handle;
  std::vector<at::Tensor> sources;

  void ReleaseSourcesIfStaged() {
    if (!sources.empty() && handle->WaitAllStaged().ok()) sources.clear();
  }
};

// [Note: staged pieces must not change] The engine calls this right after piece i is copied to host memory and
// before the piece is published as staged (SaveRequest::after_staged). A source whose version counter moved since
// save() was written in place while it was being copied (or before): the staged bytes may be from either moment,
// or a mix, so the save fails naming the tensor. Writes the staging fences allow (tessera's or torch's optimizer
// step once the unit is staged) come after the publish and are never seen here. Views share their base's counter,
// so a write through any view of a parameter counts. The counter is bumped when an in-place op returns (for CUDA,
// when the kernel is queued), so a CPU write still running when the check happens escapes it; the staging fences,
// not this check, are what keep tessera's own writes out. Inference tensors have no counter and are not checked.
absl::Status CheckUnchanged(const std::string& name, const c10::VariableVersion& counter, uint32_t at_save) {
  if (!counter.enabled()) return absl::OkStatus();
  const uint32_t now = counter.current_version();
  if (now == at_save) return absl::OkStatus();
  return absl::AbortedError(absl::StrFormat(
      "%s changed in place after save() while it was being staged (version %d -> %d); the checkpoint would mix "
      "two moments. Modify it only after the optimizer step (which waits for staging) or after the save's wait()",
      name, at_save, now));
}

std::shared_ptr<checkpoint::Storage> Local(const std::string& root) {
  return ValueOrThrow(checkpoint::NewLocalStorage(root));
}

}  // namespace

void BindCheckpoint(py::module_& m) {
  py::class_<PySaveHandle, std::shared_ptr<PySaveHandle>>(m, "SaveHandle")
      .def("wait_staged",
           [](PySaveHandle& h, int64_t i) { ThrowIfError(NoGil([&] { return h.handle->WaitStaged(i); })); })
      .def("wait_all_staged",
           [](PySaveHandle& h) {
             ThrowIfError(NoGil([&] { return h.handle->WaitAllStaged(); }));
             h.sources.clear();
           })
      .def("wait",
           [](PySaveHandle& h) {
             absl::Status s = NoGil([&] { return h.handle->Wait(); });
             h.sources.clear();  // Wait() returns after staging ended too, successful or not
             ThrowIfError(s);
           })
      .def_property_readonly("done", [](PySaveHandle& h) { return h.handle->done(); })
      .def_property_readonly("stats", [](PySaveHandle& h) {
        const checkpoint::SaveStats st = h.handle->stats();
        py::dict d;
        d["bytes"] = st.bytes;
        d["stage_seconds"] = st.stage_seconds < 0 ? py::object(py::none()) : py::object(py::float_(st.stage_seconds));
        d["durable_seconds"] =
            st.durable_seconds < 0 ? py::object(py::none()) : py::object(py::float_(st.durable_seconds));
        return d;
      });

  py::class_<CheckpointWriter>(m, "CheckpointWriter")
      .def(py::init([](const std::string& root, int threads, double commit_timeout_s, int keep_last,
                       const std::string& crash_point) {
             checkpoint::WriterOptions o;
             o.threads = threads;
             o.commit_timeout = absl::Seconds(commit_timeout_s);
             o.keep_last = keep_last;
             o.crash_point = crash_point;
             return ValueOrThrow(CheckpointWriter::Create(Local(root), o));
           }),
           py::arg("root"), py::arg("threads") = 4,
           py::arg("commit_timeout_s") = absl::ToDoubleSeconds(checkpoint::WriterOptions{}.commit_timeout),
           py::arg("keep_last") = 3, py::arg("crash_point") = "")
      .def("save",
           [](CheckpointWriter& w, int64_t step, int rank, int world_size,
              const std::vector<std::tuple<std::string, std::vector<int64_t>, int64_t, at::Tensor>>& pieces,
              const std::string& rank_json, const std::string& global_json, int64_t attempt) {
             checkpoint::SaveRequest req;
             req.step = step;
             req.attempt = attempt;
             req.rank = rank;
             req.world_size = world_size;
             req.rank_json = rank_json;
             req.global_json = global_json;
             auto h = std::make_shared<PySaveHandle>();
             // Each source's version counter and its value now, for CheckUnchanged; the counters, not the
             // tensors, so that nothing outlives staging.
             std::vector<std::tuple<std::string, c10::VariableVersion, uint32_t>> versions;
             for (const auto& [name, shape, start, tensor] : pieces) {
               const c10::VariableVersion& counter = tensor.unsafeGetTensorImpl()->version_counter();
               versions.emplace_back(name, counter, counter.enabled() ? counter.current_version() : 0);
               at::Tensor t = tensor.contiguous();  // a copy only when not contiguous: then taken now
               checkpoint::SavePiece p;
               p.name = name;
               p.shape = shape;
               p.start = start;
               p.data = ValueOrThrow(torch_rt::ViewOf(t, "checkpoint tensor '" + name + "'"));
               req.pieces.push_back(std::move(p));
               h->sources.push_back(std::move(t));
             }
             req.after_staged = [versions = std::move(versions)](int64_t i) {
               const auto& [name, counter, at_save] = versions[static_cast<size_t>(i)];
               return CheckUnchanged(name, counter, at_save);
             };
             absl::StatusOr<std::shared_ptr<SaveHandle>> made;
             {
               py::gil_scoped_release release;
               made = w.Save(std::move(req));
             }
             h->handle = ValueOrThrow(std::move(made));
             return h;
           },
           py::arg("step"), py::arg("rank"), py::arg("world_size"), py::arg("pieces"), py::arg("rank_json"),
           py::arg("global_json"), py::arg("attempt") = 0)
      .def("clean_stale", [](CheckpointWriter& w) { ThrowIfError(NoGil([&] { return w.CleanStale(); })); });

  py::class_<CheckpointReader>(m, "CheckpointReader")
      .def(py::init([](const std::string& root, int64_t step) {
             absl::StatusOr<std::unique_ptr<CheckpointReader>> r;
             {
               py::gil_scoped_release release;
               r = CheckpointReader::Open(Local(root), step);
             }
             return ValueOrThrow(std::move(r));
           }),
           py::arg("root"), py::arg("step"))
      .def_property_readonly("step", [](const CheckpointReader& r) { return r.manifest().step; })
      .def_property_readonly("world_size", [](const CheckpointReader& r) { return r.manifest().world_size; })
      .def_property_readonly("global_json", [](const CheckpointReader& r) { return r.manifest().global_json; })
      .def_property_readonly("rank_json", [](const CheckpointReader& r) { return r.manifest().rank_json; })
      .def_property_readonly("tensors",
                             [](const CheckpointReader& r) {
                               // name -> (dtype name, shape)
                               py::dict out;
                               for (const auto& t : r.manifest().tensors) {
                                 out[py::str(t.name)] = py::make_tuple(std::string(DTypeName(t.dtype)), t.shape);
                               }
                               return out;
                             })
      .def("read",
           [](CheckpointReader& r, const std::string& name, int64_t start, const at::Tensor& dst) {
             BufferView v = ValueOrThrow(torch_rt::ViewOf(dst, "read destination for '" + name + "'"));
             ThrowIfError(NoGil([&] { return r.Read(name, start, v); }));
           },
           py::arg("name"), py::arg("start"), py::arg("dst"))
      .def("verify_all", [](CheckpointReader& r) { ThrowIfError(NoGil([&] { return r.VerifyAll(); })); });

  m.def("list_committed_steps", [](const std::string& root) {
    auto storage = Local(root);
    return ValueOrThrow(checkpoint::ListCommittedSteps(*storage));
  });
  m.def("read_latest", [](const std::string& root) -> std::optional<int64_t> {
    auto storage = Local(root);
    return ValueOrThrow(checkpoint::ReadLatest(*storage));
  });
}

}  // namespace tessera::python
