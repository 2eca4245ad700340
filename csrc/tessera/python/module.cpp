#include <string>

#include "tessera/python/status_py.h"

namespace py = pybind11;

namespace tessera::python {

void RaiseStatus(const absl::Status& status) {
  // tessera.errors.from_status picks the class for the code (InvalidArgument -> ValueError subclass, ...).
  py::object exc = py::module_::import("tessera.errors")
                       .attr("from_status")(static_cast<int>(status.code()), std::string(status.message()));
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw py::error_already_set();
}

}  // namespace tessera::python

PYBIND11_MODULE(_C, m) {
  m.doc() = "tessera C++ core";
  tessera::python::BindComm(m);
  tessera::python::BindShard(m);
  tessera::python::BindKernels(m);
  tessera::python::BindCheckpoint(m);
}
