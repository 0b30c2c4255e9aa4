// ssam_kernels._host: per-tensor host loops in C (wrapped by ssam_kernels/_host_loops.py): the per-step
// host work of a planned step (ssam_kernels/ops/sam_step.py), reading the gradients' addresses and
// moving the written parameters' version counters, the list ops' operand checks and address reads, and
// the per-tensor checks of the public ops' arguments.
//
// A step must read every parameter's gradient address and check that the parameter has not
// moved and the gradient is laid out like it. In Python that is four attribute reads per tensor
// (about 0.4 us each time), most of a step's host time on models with hundreds of tensors; here
// it is a few nanoseconds per tensor. A CPython module (not a torch op: the dispatcher's argument
// parsing of a tensor list costs as much as the Python loop), optional: without it the plan does
// the same in Python.

#include <Python.h>
#include <ATen/ATen.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <vector>

namespace {

// grad_addresses(params: list[Tensor], expected: tuple[int] | None) -> tuple[int] | None
// The gradients' data addresses (0 where a parameter has none), or None if a parameter is not at
// its expected address (checked where expected is not None) or a gradient's strides or dtype
// differ from its parameter's: the caller then finds out which, and says so, in Python.
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
  THPObjectPtr out(PyTuple_New(n));  // released on every exit, a C++ exception's included
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "grad_addresses: params[%zd] is not a tensor", i);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    if (check) {
      const long long want = PyLong_AsLongLong(PyTuple_GET_ITEM(expected, i));
      if (want == -1 && PyErr_Occurred()) return nullptr;
      if (reinterpret_cast<intptr_t>(t.data_ptr()) != static_cast<intptr_t>(want)) Py_RETURN_NONE;
    }
    const at::Tensor& g = t.grad();
    long long address = 0;
    if (g.defined()) {
      // (a gradient of another dtype, which Tensor.grad_dtype allows, would be read as the
      // parameter's: the Python path says why it does not fit)
      if (!g.strides().equals(t.strides()) || g.sizes() != t.sizes() || g.scalar_type() != t.scalar_type())
        Py_RETURN_NONE;
      address = static_cast<long long>(reinterpret_cast<intptr_t>(g.data_ptr()));
    }
    PyObject* value = PyLong_FromLongLong(address);
    if (value == nullptr) return nullptr;
    PyTuple_SET_ITEM(out.get(), i, value);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

// bump_versions(tensors: list[Tensor | None]) -> None
// Each tensor's version counter moved on, as an in-place torch op moves it (the step's kernels
// write through addresses, which autograd cannot see); None entries are skipped, and tensors made
// in inference mode have none and are left alone, as torch.autograd.graph.increment_version
// does. A few ns per tensor, where torch._C._increment_version takes about 90.
PyObject* bump_versions(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &tensors)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(tensors, i);
    if (item == Py_None) continue;  // (an optional tensor the op was not given)
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "bump_versions: tensors[%zd] is not a tensor or None", i);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// data_ptrs(tensors: list[Tensor | None]) -> tuple[int]
// Each tensor's data address (0 for None): what the multi-tensor launchers put in their address
// tables and test for 16-byte alignment, in tens of ns per tensor where Python's data_ptr() loop
// takes a few hundred.
PyObject* data_ptrs(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &tensors)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  THPObjectPtr out(PyTuple_New(n));  // released on every exit, a C++ exception's included
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(tensors, i);
    long long address = 0;
    if (item != Py_None) {
      if (!THPVariable_Check(item)) {
        PyErr_Format(PyExc_TypeError, "data_ptrs: tensors[%zd] is not a tensor or None", i);
        return nullptr;
      }
      address = static_cast<long long>(reinterpret_cast<intptr_t>(THPVariable_Unpack(item).data_ptr()));
    }
    PyObject* value = PyLong_FromLongLong(address);
    if (value == nullptr) return nullptr;
    PyTuple_SET_ITEM(out.get(), i, value);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

// carve(sizes: list, like: Tensor) -> list[Tensor] | None
// New contiguous tensors of like's dtype and device, laid one after another in one allocation,
// each starting on 16 bytes: sizes[i] a tensor (a piece shaped like it) or an int (a 1-D piece of
// that many elements). One allocation and no dispatcher op per piece: each piece is a tensor of
// its own over the allocation's storage (as torch's own aliases are made, but not an autograd
// view: the list ops' backups, written only by their kernels). None where like is not a plain
// CPU or CUDA tensor (a fake or traced one, another device): the caller allocates in Python.
PyObject* carve(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *sizes = nullptr, *like_obj = nullptr;
  if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &sizes, &like_obj)) return nullptr;
  if (!THPVariable_Check(like_obj)) {
    PyErr_SetString(PyExc_TypeError, "carve: like must be a tensor");
    return nullptr;
  }
  const at::Tensor& like = THPVariable_Unpack(like_obj);
  if ((!like.is_cpu() && !like.is_cuda()) || like.key_set().has(c10::DispatchKey::Python) ||
      like.key_set().has(c10::DispatchKey::Functionalize) || like.is_sparse())
    Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(sizes);
  const int64_t step = std::max<int64_t>(1, 16 / static_cast<int64_t>(like.element_size()));
  std::vector<std::vector<int64_t>> shapes(static_cast<size_t>(n));
  std::vector<int64_t> offsets(static_cast<size_t>(n));
  int64_t total = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(sizes, i);
    int64_t numel = 0;
    if (THPVariable_Check(item)) {
      const at::Tensor& t = THPVariable_Unpack(item);
      shapes[i] = t.sizes().vec();
      numel = t.numel();
    } else if (PyLong_Check(item)) {
      numel = PyLong_AsLongLong(item);
      if (numel == -1 && PyErr_Occurred()) return nullptr;
      if (numel < 0) {
        PyErr_Format(PyExc_ValueError, "carve: sizes[%zd] is negative", i);
        return nullptr;
      }
      shapes[i] = {numel};
    } else {
      PyErr_Format(PyExc_TypeError, "carve: sizes[%zd] is neither a tensor nor an int", i);
      return nullptr;
    }
    offsets[i] = total;
    total += (numel + step - 1) / step * step;
  }
  at::Tensor flat;
  {
    pybind11::gil_scoped_release no_gil;  // (allocation may wait on the CUDA caching allocator)
    flat = at::empty({total}, like.options());
  }
  THPObjectPtr out(PyList_New(n));
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    at::Tensor piece = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(flat.storage()), flat.key_set(),
                                                                flat.dtype());
    piece.unsafeGetTensorImpl()->set_storage_offset(flat.storage_offset() + offsets[i]);
    piece.unsafeGetTensorImpl()->set_sizes_contiguous(shapes[i]);
    PyObject* wrapped = THPVariable_Wrap(std::move(piece));
    if (wrapped == nullptr) return nullptr;
    PyList_SET_ITEM(out.get(), i, wrapped);
  }
  return out.release();
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

// Whether a tensor's sizes are exactly the ints of a shape (a torch.Size, or any tuple or list of
// ints, as torch.Size() takes); false for anything else (the caller's Python check then decides).
bool sizes_equal(const at::Tensor& t, PyObject* shape) {
  if (!PyTuple_Check(shape) && !PyList_Check(shape)) return false;
  const auto sizes = t.sizes();
  if (PySequence_Fast_GET_SIZE(shape) != static_cast<Py_ssize_t>(sizes.size())) return false;
  for (size_t d = 0; d < sizes.size(); ++d) {
    PyObject* item = PySequence_Fast_GET_ITEM(shape, static_cast<Py_ssize_t>(d));
    if (!PyLong_Check(item)) return false;
    const long long s = PyLong_AsLongLong(item);
    if (s == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    if (s != sizes[d]) return false;
  }
  return true;
}

// tensors_misfit(tensors: list, floating: bool, refs: list | None, none_ok: bool = False) -> int
// The first index of a public op's tensor list that is not a tensor (nor None, where none_ok),
// (floating) not of a float dtype, or (refs) not shaped like refs[i] on its device; -1 where all
// fit. The caller (ssam_kernels/_checks.py) holds the rules and the messages: it explains the
// index in Python.
PyObject* tensors_misfit(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tensors = nullptr, *refs = nullptr;
  int floating_only = 0, none_ok = 0;
  if (!PyArg_ParseTuple(args, "O!pO|p", &PyList_Type, &tensors, &floating_only, &refs, &none_ok)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  const bool shaped = refs != Py_None;
  if (shaped && (!PyList_Check(refs) || PyList_GET_SIZE(refs) != n)) return PyLong_FromLong(0);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (none_ok && PyList_GET_ITEM(tensors, i) == Py_None) continue;
    const at::Tensor* t = nullptr;
    if (!tensor_at(tensors, i, &t) || (floating_only && !floating(*t))) return PyLong_FromSsize_t(i);
    if (shaped) {
      const at::Tensor* r = nullptr;
      if (!tensor_at(refs, i, &r) || t->sizes() != r->sizes() || t->device() != r->device())
        return PyLong_FromSsize_t(i);
    }
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

// first_elsewhere(tensors: list[Tensor]) -> int
// The first index of a tensor on another device than tensors[0] (or not a tensor), -1 where all
// share one: whether a list op's tensors span devices (each device object Python reads is a
// new torch.device, about 0.2 us).
PyObject* first_elsewhere(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &tensors)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  const at::Tensor* first = nullptr;
  if (n == 0) return PyLong_FromLong(-1);
  if (!tensor_at(tensors, 0, &first)) return PyLong_FromLong(0);
  for (Py_ssize_t i = 1; i < n; ++i) {
    const at::Tensor* t = nullptr;
    if (!tensor_at(tensors, i, &t) || t->device() != first->device()) return PyLong_FromSsize_t(i);
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

// masks_misfit(masks: list, refs: list[Tensor], bitmask_type: type) -> int
// The first index of a public op's mask list whose entry is neither None, a bool tensor shaped
// like refs[i] on its device, nor a bitmask_type instance (ssam_kernels.BitMask, whose bits its
// constructor checked against its shape) of refs[i]'s shape with its bits on refs[i]'s device;
// -1 where all fit. Explained in Python (ssam_kernels/_checks.py mask_list).
PyObject* masks_misfit(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *masks = nullptr, *refs = nullptr, *bitmask_type = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &masks, &PyList_Type, &refs, &PyType_Type, &bitmask_type))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(masks);
  if (PyList_GET_SIZE(refs) != n) return PyLong_FromLong(0);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(masks, i);
    if (item == Py_None) continue;
    const at::Tensor* r = nullptr;
    if (!tensor_at(refs, i, &r)) return PyLong_FromSsize_t(i);
    if (THPVariable_Check(item)) {
      const at::Tensor& m = THPVariable_Unpack(item);
      if (m.scalar_type() != at::kBool || m.sizes() != r->sizes() || m.device() != r->device())
        return PyLong_FromSsize_t(i);
      continue;
    }
    const int is_bitmask =
        Py_TYPE(item) == reinterpret_cast<PyTypeObject*>(bitmask_type) ? 1 : PyObject_IsInstance(item, bitmask_type);
    if (is_bitmask < 0) return nullptr;
    if (!is_bitmask) return PyLong_FromSsize_t(i);
    static PyObject* const shape_name = PyUnicode_InternFromString("shape");
    static PyObject* const bits_name = PyUnicode_InternFromString("bits");
    if (shape_name == nullptr || bits_name == nullptr) return nullptr;
    PyObject* shape = PyObject_GetAttr(item, shape_name);
    if (shape == nullptr) return nullptr;
    const bool same_shape = sizes_equal(*r, shape);
    Py_DECREF(shape);
    PyObject* bits = PyObject_GetAttr(item, bits_name);
    if (bits == nullptr) return nullptr;
    const bool same_device = THPVariable_Check(bits) && THPVariable_Unpack(bits).device() == r->device();
    Py_DECREF(bits);
    if (!same_shape || !same_device) return PyLong_FromSsize_t(i);
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

// bits_misfit(masks: list, refs: list[Tensor]) -> int
// The first index whose entry is a uint8 tensor that is not the packed bits of a mask shaped like
// refs[i] (1-D, contiguous, one byte per 8 elements: what ssam_kernels.BitMask's constructor
// checks); other entries are skipped; -1 where all fit. An op reading the bits it was passed
// (ssam_kernels/ops/bitmask.py check_mask_args) checks them all here at once.
PyObject* bits_misfit(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *masks = nullptr, *refs = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &masks, &PyList_Type, &refs)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(masks);
  if (PyList_GET_SIZE(refs) != n) return PyLong_FromLong(0);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(masks, i);
    if (!THPVariable_Check(item)) continue;
    const at::Tensor& m = THPVariable_Unpack(item);
    if (m.scalar_type() != at::kByte) continue;
    const at::Tensor* r = nullptr;
    if (!tensor_at(refs, i, &r) || m.dim() != 1 || !m.is_contiguous() || m.numel() != (r->numel() + 7) / 8)
      return PyLong_FromSsize_t(i);
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

// backup_misfit(params: list[Tensor], values: list, counts: list[int]) -> int
// The first index whose backup value does not fit what restore_ reads back: values[i] of
// params[i]'s dtype and device, shaped like it where counts[i] < 0 (an unmasked tensor), else
// 1-D with exactly counts[i] values (the mask's set bits); -1 where all fit. Explained in Python
// (ssam_kernels/ops/perturb.py check_backup).
PyObject* backup_misfit(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params = nullptr, *values = nullptr, *counts = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &params, &PyList_Type, &values, &PyList_Type, &counts))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyList_GET_SIZE(values) != n || PyList_GET_SIZE(counts) != n) return PyLong_FromLong(0);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* w = nullptr;
    const at::Tensor* v = nullptr;
    if (!tensor_at(params, i, &w) || !tensor_at(values, i, &v)) return PyLong_FromSsize_t(i);
    const long long count = PyLong_AsLongLong(PyList_GET_ITEM(counts, i));
    if (count == -1 && PyErr_Occurred()) return nullptr;
    if (v->scalar_type() != w->scalar_type() || v->device() != w->device()) return PyLong_FromSsize_t(i);
    if (count < 0 ? v->sizes() != w->sizes() : (v->dim() != 1 || v->numel() != count)) return PyLong_FromSsize_t(i);
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

// overlapping_pair(tensors: list[Tensor]) -> (i, j) | None
// Two tensors (i < j) whose spans of bytes, from each one's lowest to its highest element, meet
// on one device, or None: the same rule as ssam_kernels/_checks.py overlapping_pair (which says
// what it means), in about a microsecond for 300 tensors where the Python one takes ~100.
PyObject* overlapping_pair(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &tensors)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  // (device type, device index, first byte, one past the last byte, index)
  std::vector<std::tuple<int, int, uintptr_t, uintptr_t, Py_ssize_t>> spans;
  spans.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = nullptr;
    if (!tensor_at(tensors, i, &t)) {
      PyErr_Format(PyExc_TypeError, "overlapping_pair: tensors[%zd] is not a tensor", i);
      return nullptr;
    }
    if (t->numel() == 0) continue;
    int64_t span = 1;
    for (int64_t d = 0; d < t->dim(); ++d) span += (t->sizes()[d] - 1) * std::llabs(t->strides()[d]);
    const auto start = reinterpret_cast<uintptr_t>(t->data_ptr());
    spans.emplace_back(static_cast<int>(t->device().type()), t->device().index(), start,
                       start + static_cast<uintptr_t>(span * t->element_size()), i);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k) {
    const auto& a = spans[k - 1];
    const auto& b = spans[k];
    if (std::get<0>(a) == std::get<0>(b) && std::get<1>(a) == std::get<1>(b) && std::get<2>(b) < std::get<3>(a)) {
      const Py_ssize_t i = std::get<4>(a), j = std::get<4>(b);
      return Py_BuildValue("(nn)", std::min(i, j), std::max(i, j));
    }
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// same_entries(dicts: list[dict], key: str, expected: list) -> bool
// Whether dicts[i].get(key) is expected[i] for every i (None where a dict lacks the key), with as
// many dicts as expected values: an optimizer's per-parameter state still holding the momentum
// buffers a planned step keeps (python/ssam/sam.py).
PyObject* same_entries(PyObject* /*self*/, PyObject* args) {
  PyObject *dicts = nullptr, *key = nullptr, *expected = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &dicts, &PyUnicode_Type, &key, &PyList_Type, &expected))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  if (PyList_GET_SIZE(expected) != n) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* entry = PyList_GET_ITEM(dicts, i);
    if (!PyDict_Check(entry)) {
      PyErr_Format(PyExc_TypeError, "same_entries: dicts[%zd] is not a dict (a %s)", i, Py_TYPE(entry)->tp_name);
      return nullptr;
    }
    PyObject* value = PyDict_GetItemWithError(entry, key);  // borrowed
    if (value == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      value = Py_None;
    }
    if (value != PyList_GET_ITEM(expected, i)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// same_values(d: dict, expected: list) -> bool
// Whether d's values, in d's order, are the objects of expected (as many of each): an optimizer's
// state dict with no entry replaced, added or removed since its values were listed (python/ssam/
// sam.py). Reads the dict's slots: no key is hashed (a tensor's hash is a Python call).
PyObject* same_values(PyObject* /*self*/, PyObject* args) {
  PyObject *d = nullptr, *expected = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyDict_Type, &d, &PyList_Type, &expected)) return nullptr;
  if (PyDict_Size(d) != PyList_GET_SIZE(expected)) Py_RETURN_FALSE;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key = nullptr, *value = nullptr;  // borrowed
  while (PyDict_Next(d, &pos, &key, &value)) {
    if (value != PyList_GET_ITEM(expected, i++)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// same_versions(tensors: list[Tensor], versions: tuple[int]) -> bool
// Whether each tensor's version counter still reads versions[i] (-1 for a tensor made in
// inference mode, which has none), as many of each: the mask bits a planned step's kernels read,
// unwritten since the plan counted them (ssam_kernels/ops/sam_step.py).
PyObject* same_versions(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tensors = nullptr, *versions = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &tensors, &PyTuple_Type, &versions)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  if (PyTuple_GET_SIZE(versions) != n) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(tensors, i);
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "same_versions: tensors[%zd] is not a tensor", i);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    const long long want = PyLong_AsLongLong(PyTuple_GET_ITEM(versions, i));
    if (want == -1 && PyErr_Occurred()) return nullptr;
    const long long version = t.is_inference() ? -1 : static_cast<long long>(t._version());
    if (version != want) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"grad_addresses", grad_addresses, METH_VARARGS,
     "grad_addresses(params, expected) -> tuple of the gradients' addresses (0: none), or None on a mismatch"},
    {"bump_versions", bump_versions, METH_VARARGS,
     "bump_versions(tensors) -> None: each tensor's version counter moved on, as an in-place op does"},
    {"data_ptrs", data_ptrs, METH_VARARGS, "data_ptrs(tensors) -> tuple of each tensor's data address (0 for None)"},
    {"operands_misfit", operands_misfit, METH_VARARGS,
     "operands_misfit(params, shaped, values, masks) -> the first index the list ops cannot take, or -1"},
    {"tensors_misfit", tensors_misfit, METH_VARARGS,
     "tensors_misfit(tensors, floating, refs, none_ok=False) -> the first index not a (floating) tensor shaped like "
     "refs[i] (or None), or -1"},
    {"carve", carve, METH_VARARGS,
     "carve(sizes, like) -> contiguous tensors shaped like sizes[i] (a tensor or a length) in one allocation, each "
     "on 16 bytes; None for a tensor that is not a plain CPU or CUDA one"},
    {"first_elsewhere", first_elsewhere, METH_VARARGS,
     "first_elsewhere(tensors) -> the first index of a tensor on another device than tensors[0], or -1"},
    {"masks_misfit", masks_misfit, METH_VARARGS,
     "masks_misfit(masks, refs, bitmask_type) -> the first index not None or a mask shaped like refs[i], or -1"},
    {"bits_misfit", bits_misfit, METH_VARARGS,
     "bits_misfit(masks, refs) -> the first index whose uint8 entry is not refs[i]'s packed mask bits, or -1"},
    {"backup_misfit", backup_misfit, METH_VARARGS,
     "backup_misfit(params, values, counts) -> the first index whose backup value does not fit, or -1"},
    {"overlapping_pair", overlapping_pair, METH_VARARGS,
     "overlapping_pair(tensors) -> (i, j), i < j, of two tensors whose byte spans meet on one device, or None"},
    {"same_entries", same_entries, METH_VARARGS,
     "same_entries(dicts, key, expected) -> whether dicts[i].get(key) is expected[i] for every i"},
    {"same_values", same_values, METH_VARARGS,
     "same_values(d, expected) -> whether d's values, in order, are the objects of expected"},
    {"same_versions", same_versions, METH_VARARGS,
     "same_versions(tensors, versions) -> whether tensors[i]'s version counter reads versions[i] (-1: inference)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_host", "Per-tensor host loops in C: the planned step's per-step work, the list ops' checks and addresses.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__host() { return PyModule_Create(&module); }
