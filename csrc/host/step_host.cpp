// ssam_kernels._host: per-tensor host loops in C (wrapped by ssam_kernels/_host_loops.py): the per-step
// host work of a planned step (ssam_kernels/ops/sam_step.py), reading the gradients' addresses and
// moving the written parameters' version counters, and the check of the list ops' operands.
//
// A step must read every parameter's gradient address and check that the parameter has not
// moved and the gradient is laid out like it. In Python that is four attribute reads per tensor
// (about 0.4 us each time), most of a step's host time on models with hundreds of tensors; here
// it is a few nanoseconds per tensor. A CPython module (not a torch op: the dispatcher's argument
// parsing of a tensor list costs as much as the Python loop), optional: without it the plan does
// the same in Python.

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

namespace {

// grad_addresses(params: list[Tensor], expected: tuple[int] | None) -> tuple[int] | None
// The gradients' data addresses (0 where a parameter has none), or None if a parameter is not at
// its expected address (checked where expected is not None) or a gradient's strides differ from
// its parameter's: the caller then finds out which, and says so, in Python.
PyObject* grad_addresses(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
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
  END_HANDLE_TH_ERRORS
}

// bump_versions(tensors: list[Tensor]) -> None
// Each tensor's version counter moved on, as an in-place torch op moves it (the step's kernels
// write through addresses, which autograd cannot see); tensors made in inference mode have none
// and are left alone, as torch.autograd.graph.increment_version does. A few ns per tensor, where
// torch._C._increment_version takes about 90.
PyObject* bump_versions(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
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
  END_HANDLE_TH_ERRORS
}

// the dtypes the list ops' kernels take (ssam_kernels/_checks.py FLOAT_DTYPES)
bool floating(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

bool tensor_at(PyObject* list, Py_ssize_t i, const at::Tensor** out) {
  PyObject* item = PyList_GET_ITEM(list, i);
  if (!THPVariable_Check(item)) return false;
  *out = &THPVariable_Unpack(item);
  return true;
}

// operands_misfit(params, shaped, values, masks) -> int
// The first index whose operands the list ops (perturb_, restore_, restore_sgd_step_) cannot take
// as they are, or -1; the caller (ssam_kernels/_host_loops.py, which holds the rules and the
// messages) checked the lists' lengths and says what does not fit. params[i]: floating, on
// params[0]'s device; every shaped[j][i]: floating, as many elements, same device; values[i]: the
// param's dtype and device, all of it (no mask) or 1-D and at most as many (a mask); masks[i]: None,
// a bool tensor of as many elements or 1-D contiguous uint8 bits, one byte per 8 elements, same device.
PyObject* operands_misfit(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS  // a C++ exception (a tensor method throwing) becomes a Python one, never an abort
  PyObject *params = nullptr, *shaped = nullptr, *values = nullptr, *masks = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O!O!", &PyList_Type, &params, &PyList_Type, &shaped, &PyList_Type, &values,
                        &PyList_Type, &masks))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const Py_ssize_t lists = PyList_GET_SIZE(shaped);
  for (Py_ssize_t j = 0; j < lists; ++j) {
    PyObject* list = PyList_GET_ITEM(shaped, j);
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != n) return PyLong_FromLong(0);
  }
  if (PyList_GET_SIZE(values) != n || PyList_GET_SIZE(masks) != n) return PyLong_FromLong(0);
  c10::Device device(c10::kCPU);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* w = nullptr;
    const at::Tensor* v = nullptr;
    if (!tensor_at(params, i, &w) || !tensor_at(values, i, &v)) return PyLong_FromSsize_t(i);
    if (i == 0) device = w->device();
    const int64_t numel = w->numel();
    if (!floating(*w) || w->device() != device) return PyLong_FromSsize_t(i);
    for (Py_ssize_t j = 0; j < lists; ++j) {
      const at::Tensor* s = nullptr;
      if (!tensor_at(PyList_GET_ITEM(shaped, j), i, &s) || !floating(*s) || s->numel() != numel ||
          s->device() != device)
        return PyLong_FromSsize_t(i);
    }
    if (v->scalar_type() != w->scalar_type() || v->device() != device) return PyLong_FromSsize_t(i);
    PyObject* item = PyList_GET_ITEM(masks, i);
    if (item == Py_None) {
      if (v->numel() != numel) return PyLong_FromSsize_t(i);
      continue;
    }
    if (!THPVariable_Check(item)) return PyLong_FromSsize_t(i);
    const at::Tensor& m = THPVariable_Unpack(item);
    const bool bits =
        m.scalar_type() == at::kByte && m.dim() == 1 && m.numel() == (numel + 7) / 8 && m.is_contiguous();
    const bool flags = m.scalar_type() == at::kBool && m.numel() == numel;
    if (!(bits || flags) || m.device() != device || v->dim() != 1 || v->numel() > numel) return PyLong_FromSsize_t(i);
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"grad_addresses", grad_addresses, METH_VARARGS,
     "grad_addresses(params, expected) -> tuple of the gradients' addresses (0: none), or None on a mismatch"},
    {"bump_versions", bump_versions, METH_VARARGS,
     "bump_versions(tensors) -> None: each tensor's version counter moved on, as an in-place op does"},
    {"operands_misfit", operands_misfit, METH_VARARGS,
     "operands_misfit(params, shaped, values, masks) -> the first index the list ops cannot take, or -1"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_host", "Per-tensor host loops in C: the planned step's per-step work, the list ops' checks.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__host() { return PyModule_Create(&module); }
