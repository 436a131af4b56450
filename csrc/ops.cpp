// The schema of every compiled op, in one place (the kernels live in slack_ctc_cpu.cpp and
// slack_ctc_cuda.cu, one TORCH_LIBRARY_IMPL per device), and the module entry point that lets
// Python `import mdlm_ctc._C` load this library.
//
// mode: 0 = preserve (the collapse deletes the special token only), 1 = standard CTC.
// max_shift < 0 means "no limit". band_width is the width W of post_target; it must be at least
// the largest column band of any row (mdlm_ctc/_validation.py computes it), extra columns stay 0.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mdlm_ctc_C, m) {
  m.def(
      "lattice_forward(Tensor logits, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
      "Tensor? observed, int special_id, int mode, int max_shift, int band_width, bool need_grad, "
      "bool normalize) -> (Tensor nll, Tensor lse, Tensor post_target, Tensor post_special)");
  m.def(
      "lattice_backward(Tensor grad_nll, Tensor logits, Tensor lse, Tensor targets, Tensor input_lengths, "
      "Tensor target_lengths, Tensor? observed, Tensor post_target, Tensor post_special, Tensor nll, "
      "int special_id, int mode, int max_shift, bool zero_infinity, bool normalize) -> Tensor");
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mdlm-ctc compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
