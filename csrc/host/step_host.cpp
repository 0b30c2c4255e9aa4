// ssam_kernels._host: the per-step host work of a planned step (ssam_kernels/ops/sam_step.py) in C:
// reading the gradients' addresses and moving the written parameters' version counters.
//
// A step must read every parameter's gradient address and check that the parameter has not
// moved and the gradient is laid out like it. In Python that is four attribute reads per tensor
// (about 0.4 us each time), most of a step's host time on models with hundreds of tensors; here
// it is a few nanoseconds per tensor. A CPython module (not a torch op: the dispatcher's argument
// parsing of a tensor list costs as much as the Python loop), optional: without it the plan does
// the same in Python.

#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

namespace {

// grad_addresses(params: list[Tensor], expected: tuple[int] | None) -> tuple[int] | None
// The gradients' data addresses (0 where a parameter has none), or None if a parameter is not at
// its expected address (checked where expected is not None) or a gradient's strides differ from
// its parameter's: the caller then finds out which, and says so, in Python.
PyObject* grad_addresses(PyObject* /*self*/, PyObject* args) {
  PyObject* params = nullptr;
  PyObject* expected = nullptr;
  if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &params, &expected)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const bool check = expected != Py_None;
  if (check && (!PyTuple_Check(expected) || PyTuple_GET_SIZE(expected) != n)) {
    PyErr_SetString(PyExc_ValueError, "grad_addresses: expected must be None or a tuple of one address per parameter");
    return nullptr;
  }
  PyObject* out = PyTuple_New(n);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(item)) {
      Py_DECREF(out);
      PyErr_Format(PyExc_TypeError, "grad_addresses: params[%zd] is not a tensor", i);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    if (check) {
      const long long want = PyLong_AsLongLong(PyTuple_GET_ITEM(expected, i));
      if (want == -1 && PyErr_Occurred()) {
        Py_DECREF(out);
        return nullptr;
      }
      if (reinterpret_cast<intptr_t>(t.data_ptr()) != static_cast<intptr_t>(want)) {
        Py_DECREF(out);
        Py_RETURN_NONE;
      }
    }
    const at::Tensor& g = t.grad();
    long long address = 0;
    if (g.defined()) {
      if (!g.strides().equals(t.strides()) || g.sizes() != t.sizes()) {
        Py_DECREF(out);
        Py_RETURN_NONE;
      }
      address = static_cast<long long>(reinterpret_cast<intptr_t>(g.data_ptr()));
    }
    PyObject* value = PyLong_FromLongLong(address);
    if (value == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, i, value);
  }
  return out;
}

// bump_versions(tensors: list[Tensor]) -> None
// Each tensor's version counter moved on, as an in-place torch op moves it (the step's kernels
// write through addresses, which autograd cannot see); tensors made in inference mode have none
// and are left alone, as torch.autograd.graph.increment_version does. A few ns per tensor, where
// torch._C._increment_version takes about 90.
PyObject* bump_versions(PyObject* /*self*/, PyObject* args) {
  PyObject* tensors = nullptr;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &tensors)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(tensors, i);
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "bump_versions: tensors[%zd] is not a tensor", i);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"grad_addresses", grad_addresses, METH_VARARGS,
     "grad_addresses(params, expected) -> tuple of the gradients' addresses (0: none), or None on a mismatch"},
    {"bump_versions", bump_versions, METH_VARARGS,
     "bump_versions(tensors) -> None: each tensor's version counter moved on, as an in-place op does"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_host", "The planned SAM step's per-step host work, in C.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__host() { return PyModule_Create(&module); }
