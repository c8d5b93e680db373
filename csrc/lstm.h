// Shared declarations of the lstm_fast extension: one LSTM layer, one direction.
//
// Dimension glossary (same as lstm_fast/backends/base.py):
//   T  sequence length       B  batch rows (padded batch)
//   H  hidden size           P  recurrent state size (proj_size if > 0, else H)
//   G = 4H gate columns, order i, f, g, o (torch.nn.LSTM's)
//
// Ops (schemas in lstm_ops.cpp, namespace lstm_fast):
//   lstm_forward(gx, h0, c0, w_hh, w_hr?, batch_sizes?, reverse, need_grad)
//       -> (y [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,G], cells [T,B,H])
//   lstm_forward_projected(x, w_ih, bias?, h0, c0, w_hh, w_hr?, batch_sizes?, reverse, need_grad)
//       -> the same five, with gx = x [T,B,I] @ w_ih^T [4H,I] + bias [4H] computed
//          inside the time loop's threads (CPU only)
//   lstm_backward(grad_y, grad_hn, grad_cn, gates, cells, y, h0, c0, w_hh, w_hr?,
//                 batch_sizes?, reverse)
//       -> (d_gx [T,B,G], d_h0 [B,P], d_c0 [B,H], d_w_hh [G,P], d_w_hr [P,H] or [0])
// All three take trailing optional masks (recurrent_mask, zone_c, zone_h), the
// regularisers of StepMasks below; forward and backward must get the same ones.
// gates (activated i,f,g,o) and cells (c_t) are what backward needs; they are
// [0]-sized when need_grad is false. They are kept in the accumulation type
// (float for half/bfloat16 input, else the input dtype). Every output is a
// fresh tensor (no aliasing of inputs). With batch_sizes every [T,B,*] above
// is packed [N,*] instead (see Plan).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace lstm_fast {

using at::Tensor;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Argument bundles: the NamedTuples of lstm_fast/backends/base.py, same names
// and fields, so that the C++ and Python sides name things alike.

// Sizes of one call.
struct LayerSizes {
  int64_t T = 0, B = 0, H = 0, P = 0;
  bool packed = false;
  bool reverse = false;
};

// A state: h [B,P], c [B,H] (the initial one, h0 and c0, in the ops).
struct LSTMState {
  Tensor h, c;
};

// w_hh [4H,P]; w_hr [P,H], or none without a projection.
struct RecurrentWeights {
  Tensor w_hh;
  std::optional<Tensor> w_hr;
  bool has_proj() const { return w_hr.has_value() && w_hr->defined(); }
};

// gx = x [T,B,I] @ w_ih^T [4H,I] + bias [4H] (or no bias).
struct InputProjection {
  Tensor w_ih;
  std::optional<Tensor> bias;
};

// batch_sizes: a CPU int64 tensor [T] for packed input, or none; reverse:
// process t = T-1 .. 0.
struct SequenceLayout {
  std::optional<Tensor> batch_sizes;
  bool reverse = false;
};

// The regularisers' masks (lstm_fast/backends/base.py StepMasks), each optional,
// in h0's dtype: recurrent [B,P] multiplies h_{t-1} in the recurrent product;
// zone_c [T,B,H] and zone_h [T,B,P] (packed [N,*]) weight c_{t-1} and h_{t-1} in
// c_t = zc c_{t-1} + (1-zc) c~_t, h_t = zh h_{t-1} + (1-zh) h~_t, where c~_t is
// the plain update and h~_t = o tanh(c~_t) (then W_hr). cells saves c_t.
struct StepMasks {
  std::optional<Tensor> recurrent, zone_c, zone_h;
  static bool on(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }
  bool any() const { return on(recurrent) || on(zone_c) || on(zone_h); }
};

// Upstream gradients of the outputs: y [T,B,P], h_n [B,P], c_n [B,H].
struct OutputGrads {
  Tensor y, h_n, c_n;
};

// Sizes and per-step rows of one call, validated once on the host.
//
// Per-step tensors (gx, y, gates, cells, grad_y, d_gx) come in one of two
// layouts: padded [T,B,*] (step t at rows t*B ..), or packed [N,*], the data of
// a PackedSequence (batch_sizes given: step t holds the batch's first
// batch_sizes[t] rows, at rows row0[t] .., only real tokens). Either way step t
// is rows row0[t] .. row0[t] + active - 1 of the tensor read as [rows, width].
struct Plan : LayerSizes {
  // order[s]: time index processed at step s; active[s]: rows 0..active[s)-1
  // take part in that step. Forward, active never grows; reverse (packed) it
  // never shrinks: a row joins with its h0/c0 at its last time index.
  std::vector<int64_t> order, active;
  std::vector<int64_t> row0;  // [T] first row of each time index
  int64_t N = 0;              // rows of the per-step tensors: T*B or sum(batch_sizes)

  // Rows of step s whose previous state is the previous step's output (the
  // others start from h0/c0 at this step).
  int64_t rows_with_prev(int64_t s) const { return s == 0 ? 0 : std::min(active[s], active[s - 1]); }
  // The sizes of a per-step tensor of this width.
  std::vector<int64_t> step_sizes(int64_t width) const {
    return packed ? std::vector<int64_t>{N, width} : std::vector<int64_t>{T, B, width};
  }
  // The first n rows of time index t of a per-step tensor, as [n, width].
  Tensor rows(const Tensor& per_step, int64_t t, int64_t n) const {
    return packed ? per_step.narrow(0, row0[t], n) : per_step.select(0, t).narrow(0, 0, n);
  }
};

// Checks shapes, dtypes and devices and reads seq.batch_sizes into
// plan.active and plan.row0. gx gives only sizes ([T,B,4H], or [N,4H] when
// packed) and the device (backward passes gates here); the state and the
// weights share one dtype.
Plan make_plan(const Tensor& gx, const LSTMState& init, const RecurrentWeights& w, const SequenceLayout& seq);

// float for half/bfloat16, else t: the type of gates, cells and cell state.
at::ScalarType acc_type(at::ScalarType t);
// gx [T,B,4H] must have h0's dtype.
void check_forward_inputs(const Tensor& gx, const Tensor& h0);
// Shapes, dtype and device of the masks against the plan (h0 gives dtype and device).
void check_masks(const Plan& plan, const StepMasks& masks, const Tensor& h0);
// Shapes/dtypes of lstm_backward's inputs against the plan (see the schema above).
void check_backward_inputs(const Plan& plan, const OutputGrads& grads, const Tensor& gates, const Tensor& cells,
                           const Tensor& y, const Tensor& h0);

// h_n [B,P] from y and h0 [B,P]: each row's output at its last processed
// step, h0 for rows never active. Returns a fresh tensor.
Tensor final_hidden(const Tensor& y, const Tensor& h0, const Plan& plan);

// Weight gradients as GEMMs over all rows, after the time loop:
//   d_w_hh [G,P] = sum_t d_gates[t]^T @ hprev[t], hprev[t] = h_{t-1} (h0 at a
//   row's first processed step, else y of the previous processed step);
//   d_w_hr [P,H] = d_r^T @ h_pre (only when d_r is defined).
// d_gates [T,B,G] and y [T,B,P] in the input dtype, h0 [B,P]; d_r [T,B,P] and
// h_pre [T,B,H] in the input dtype or undefined ([N,*] each when packed). Results are fresh tensors in the weights'
// dtype. rec_mask [B,P] or undefined: hprev entered the product as hprev * rec_mask.
std::tuple<Tensor, Tensor> weight_grads(const Tensor& d_gates, const Tensor& y, const Tensor& h0, const Tensor& d_r,
                                        const Tensor& h_pre, const Plan& plan, const Tensor& w_hh,
                                        const Tensor& rec_mask = Tensor());

// The implementations of the ops (CPU here; CUDA in cuda/lstm_cuda.cu), on bundles.
Tensor5 lstm_forward_cpu(const Tensor& gx, const LSTMState& init, const RecurrentWeights& w, const SequenceLayout& seq,
                         bool need_grad, const StepMasks& masks);
Tensor5 lstm_forward_projected_cpu(const Tensor& x, const InputProjection& in, const LSTMState& init,
                                   const RecurrentWeights& w, const SequenceLayout& seq, bool need_grad,
                                   const StepMasks& masks);
Tensor5 lstm_backward_cpu(const OutputGrads& grads, const Tensor& gates, const Tensor& cells, const Tensor& y,
                          const LSTMState& init, const RecurrentWeights& w, const SequenceLayout& seq,
                          const StepMasks& masks);

// Op entry points: the schemas' flat arguments, bundled for an implementation.
// TORCH_LIBRARY_IMPL registers e.g. &forward_op<lstm_forward_cpu>.
using ForwardImpl = Tensor5 (*)(const Tensor&, const LSTMState&, const RecurrentWeights&, const SequenceLayout&, bool,
                                const StepMasks&);
using ForwardProjectedImpl = Tensor5 (*)(const Tensor&, const InputProjection&, const LSTMState&,
                                         const RecurrentWeights&, const SequenceLayout&, bool, const StepMasks&);
using BackwardImpl = Tensor5 (*)(const OutputGrads&, const Tensor&, const Tensor&, const Tensor&, const LSTMState&,
                                 const RecurrentWeights&, const SequenceLayout&, const StepMasks&);
using OptTensor = std::optional<Tensor>;

template <ForwardImpl impl>
Tensor5 forward_op(const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr,
                   const OptTensor& batch_sizes, bool reverse, bool need_grad, const OptTensor& recurrent_mask,
                   const OptTensor& zone_c, const OptTensor& zone_h) {
  return impl(gx, {h0, c0}, {w_hh, w_hr}, {batch_sizes, reverse}, need_grad, {recurrent_mask, zone_c, zone_h});
}

template <ForwardProjectedImpl impl>
Tensor5 forward_projected_op(const Tensor& x, const Tensor& w_ih, const OptTensor& bias, const Tensor& h0,
                             const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
                             bool reverse, bool need_grad, const OptTensor& recurrent_mask, const OptTensor& zone_c,
                             const OptTensor& zone_h) {
  return impl(x, {w_ih, bias}, {h0, c0}, {w_hh, w_hr}, {batch_sizes, reverse}, need_grad,
              {recurrent_mask, zone_c, zone_h});
}

template <BackwardImpl impl>
Tensor5 backward_op(const Tensor& grad_y, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& gates,
                    const Tensor& cells, const Tensor& y, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                    const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse, const OptTensor& recurrent_mask,
                    const OptTensor& zone_c, const OptTensor& zone_h) {
  return impl({grad_y, grad_hn, grad_cn}, gates, cells, y, {h0, c0}, {w_hh, w_hr}, {batch_sizes, reverse},
              {recurrent_mask, zone_c, zone_h});
}

}  // namespace lstm_fast
