// The schema of every compiled op, in one place (kernels: slack_ctc_cpu.cpp, slack_ctc_cuda.cu, one
// TORCH_LIBRARY_IMPL per device), and the module entry point that lets `import mdlm_ctc._C` load it.
//
// A loss is three stages (SPEC §5); every backend implements them with these semantics
// (mdlm_ctc/reference.py has the readable version, mdlm_ctc/backends.py composes them):
//
// emissions: the vocabulary pass. For frames t < input_lengths[b]:
//     lse[b, t]          logsumexp_v logits[b, t, v]      (0 when normalize is false)
//     table[b, t, j]     e_{t+1}(y_u) for u = column_lo(t+1) + j <= column_hi(t+1) (lattice.h), 0 after
//     special[b, t]      e_{t+1}(k), or NaN if the frame has any NaN (so the lattice sees it)
//   with e(x) = logits[b, t, x] - lse[b, t], 0 / -inf at observed frames (token == observed or not).
//   Frames t >= input_lengths[b] are all 0. max_shift is -1 for "none" (and for standard CTC).
// lattice_band: alpha (and with need_grad beta) over the band table. Returns nll [B] (+inf for an
//   infeasible row, NaN for a row with NaN emissions). With need_grad it overwrites table with the
//   posteriors of the target columns and special with the posterior of k (0 on infeasible rows and
//   past the input length, NaN on NaN rows). The slots past a frame's last column are part of the
//   contract on the way in: emissions writes 0 there, and the CPU standard lattice leaves them.
// gradient: g[b] * (softmax - posterior) in the logits' dtype (-g * posterior when normalize is
//   false); 0 past the input length and at observed frames; on an infeasible row 0 with
//   zero_infinity, NaN without (PyTorch's convention).
//
// The windowed stages (what the fused LM head, mdlm_ctc/linear.py, runs on one chunk of logits at a
// time): the same values over a window of the flat frames i = b*T + t, frame_offset <= i <
// frame_offset + n, with the logits given as [n, V] (T = frames_per_row). emissions_window returns the
// window's lse [n], table [n, W] and special [n]; gradient_window reads the window's lse and
// posteriors ([n], [n, W], [n]; observed stays [B, T]) and the logits of a vocabulary window
// [vocab_offset, vocab_offset + v) ([n, v]), and writes the gradient of that window into out [n, v],
// which may be the logits themselves (each frame reads its logits before writing).
//
// pooled_empty (CPU only): an uninitialised contiguous tensor of `size` with like's dtype, from the
// CPU kernels' buffer pool (slack_ctc_cpu.cpp, OutputPool), for the fused LM head's chunk buffers.
//
// The two-pass stages (mdlm_ctc/_ops.py: the gradient's softmax written in the vocabulary pass; the
// backward then only touches the band's columns and the special token, and rescales a row only where
// its upstream gradient is not exactly 1). With w = row_scale[b], the row's share of the reduced loss:
// emissions_grad: emissions' values (normalize true), and in the same sweep over each frame
//     grad[b, t, v]        round(w * softmax_v) in grad's dtype, 0 past the input length and at observed
//                          frames; grad may be the logits themselves (each frame is read before written)
//     soft_target[b, t, j] the unrounded softmax (acc) at band slot j (0 outside the band, inactive or
//                          observed frames), soft_special[b, t] at k: the very values w multiplied
// gradient_finish: in place on grad (round(w * softmax) from emissions_grad), with g = grad_rows[b]:
//     a frame of a row whose g is not exactly 1 is scaled, round(g * grad), once; an infeasible row gets
//     0 (zero_infinity) or NaN at its active free frames; then at every band token and at k of a live
//     frame round((g * w) * (softmax - posterior)), the posteriors of a repeated token summed in band
//     order (after k's). The three-pass gradient with grad_nll = g * w gives the same values to the
//     dtype's rounding (bitwise where the softmax is computed the same way and g is 1).
// emissions_grad_window: emissions_grad over a window of flat frames ([n, V] logits and grad).
// band_values_window: over a window of frames, from the band tables of emissions_grad(_window):
//     values [n, W] = (g * w) * (softmax - summed posterior of the slot's token) at each token's last
//     slot in the band (its "writer"; mdlm_ctc.reference.band_links), special [n] the same at k (when k
//     is not a band token); unspecified elsewhere and at frames that are not live. The fused LM head's
//     sparse correction (mdlm_ctc/linear.py) subtracts these sparsely.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mdlm_ctc_C, m) {
  m.def(
      "emissions(Tensor logits, Tensor targets, Tensor input_lengths, Tensor target_lengths, Tensor? observed, "
      "int special_id, int max_shift, int band_width, bool normalize) -> (Tensor lse, Tensor table, Tensor special)");
  m.def(
      "lattice_band(Tensor(a!) table, Tensor(b!) special, Tensor targets, Tensor input_lengths, "
      "Tensor target_lengths, int mode, int max_shift, bool need_grad) -> Tensor nll");
  m.def(
      "gradient(Tensor grad_nll, Tensor logits, Tensor lse, Tensor targets, Tensor input_lengths, "
      "Tensor target_lengths, Tensor? observed, Tensor post_target, Tensor post_special, Tensor nll, "
      "int special_id, int max_shift, bool zero_infinity, bool normalize) -> Tensor");
  m.def(
      "emissions_window(Tensor logits, int frame_offset, int frames_per_row, Tensor targets, Tensor input_lengths, "
      "Tensor target_lengths, Tensor? observed, int special_id, int max_shift, int band_width, bool normalize) "
      "-> (Tensor lse, Tensor table, Tensor special)");
  m.def(
      "gradient_window(Tensor grad_nll, Tensor logits, int frame_offset, int frames_per_row, int vocab_offset, "
      "int vocab_size, Tensor lse, Tensor targets, Tensor input_lengths, Tensor target_lengths, Tensor? observed, "
      "Tensor post_target, Tensor post_special, Tensor nll, int special_id, int max_shift, bool zero_infinity, "
      "bool normalize, Tensor(a!) out) -> ()");
  m.def("pooled_empty(Tensor like, int[] size) -> Tensor");
  m.def(
      "emissions_grad(Tensor logits, Tensor targets, Tensor input_lengths, Tensor target_lengths, Tensor? observed, "
      "int special_id, int max_shift, int band_width, Tensor row_scale, Tensor(a!) grad) "
      "-> (Tensor lse, Tensor table, Tensor special, Tensor soft_target, Tensor soft_special)");
  m.def(
      "emissions_grad_window(Tensor logits, int frame_offset, int frames_per_row, Tensor targets, "
      "Tensor input_lengths, Tensor target_lengths, Tensor? observed, int special_id, int max_shift, int band_width, "
      "Tensor row_scale, Tensor(a!) grad) -> (Tensor lse, Tensor table, Tensor special, Tensor soft_target, "
      "Tensor soft_special)");
  m.def(
      "gradient_finish(Tensor grad_rows, Tensor row_scale, Tensor nll, Tensor targets, Tensor input_lengths, "
      "Tensor target_lengths, Tensor? observed, Tensor soft_target, Tensor soft_special, Tensor post_target, "
      "Tensor post_special, int special_id, int max_shift, bool zero_infinity, Tensor(a!) grad) -> ()");
  m.def(
      "band_values_window(Tensor grad_rows, Tensor row_scale, Tensor nll, int frame_offset, int frames_per_row, "
      "int vocab_size, Tensor targets, Tensor input_lengths, Tensor target_lengths, Tensor? observed, "
      "Tensor soft_target, Tensor soft_special, Tensor post_target, Tensor post_special, int special_id, "
      "int max_shift) -> (Tensor values, Tensor special)");
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mdlm-ctc compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
