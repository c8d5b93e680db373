// Op schemas of the lstm_fast namespace and the device-independent glue
// (validation, final hidden state, weight gradients) shared by the CPU and
// CUDA implementations. The fake (meta) implementations live in Python
// (lstm_fast/_ops.py) so that torch.compile can trace the ops.
#include <Python.h>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "lstm.h"

namespace lstm_fast {

Plan make_plan(const Tensor& gx, const LSTMState& init, const RecurrentWeights& w, const SequenceLayout& seq) {
  const Tensor &h0 = init.h, &c0 = init.c, &w_hh = w.w_hh;
  const std::optional<Tensor>& w_hr = w.w_hr;
  Plan p;
  p.packed = seq.batch_sizes.has_value() && seq.batch_sizes->defined();
  TORCH_CHECK(h0.dim() == 2, "lstm_fast: h0 must be [B, P], got ", h0.sizes());
  if (p.packed) {
    TORCH_CHECK(gx.dim() == 2, "lstm_fast: packed gx must be [N, 4H], got ", gx.sizes());
    p.N = gx.size(0);
    p.B = h0.size(0);
  } else {
    TORCH_CHECK(gx.dim() == 3, "lstm_fast: gx must be [T, B, 4H], got ", gx.sizes());
    p.T = gx.size(0);
    p.B = gx.size(1);
    p.N = p.T * p.B;
  }
  const int64_t G = gx.size(-1);
  TORCH_CHECK(G % 4 == 0 && G > 0, "lstm_fast: gx's last dim must be 4H > 0, got ", G);
  p.H = G / 4;
  TORCH_CHECK(h0.size(0) == p.B, "lstm_fast: h0 must be [B, P] with B=", p.B, ", got ", h0.sizes());
  p.P = h0.size(1);
  TORCH_CHECK(c0.dim() == 2 && c0.size(0) == p.B && c0.size(1) == p.H, "lstm_fast: c0 must be [", p.B, ", ", p.H,
              "], got ", c0.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * p.H && w_hh.size(1) == p.P, "lstm_fast: w_hh must be [", 4 * p.H,
              ", ", p.P, "], got ", w_hh.sizes());
  const bool proj = w.has_proj();
  if (proj) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) == p.P && w_hr->size(1) == p.H, "lstm_fast: w_hr must be [", p.P,
                ", ", p.H, "], got ", w_hr->sizes());
  } else {
    TORCH_CHECK(p.P == p.H, "lstm_fast: h0 is [B, ", p.P, "] but there is no projection and H=", p.H);
  }
  for (const Tensor* t : {&c0, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == h0.scalar_type() && t->device() == gx.device(),
                "lstm_fast: h0, c0 and the weights must share one dtype (", h0.scalar_type(), ") and gx's device (",
                gx.device(), "), got ", t->scalar_type(), ", ", t->device());
  }
  TORCH_CHECK(h0.device() == gx.device(), "lstm_fast: h0 must be on gx's device");
  if (proj) {
    TORCH_CHECK(w_hr->scalar_type() == h0.scalar_type() && w_hr->device() == gx.device(),
                "lstm_fast: w_hr must share h0's dtype and gx's device");
  }
  std::vector<int64_t> sizes;  // active rows per time index
  if (p.packed) {
    const Tensor& bs = *seq.batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1,
                "lstm_fast: batch_sizes must be a 1-D CPU int64 tensor, got ", bs.scalar_type(), " ", bs.device(), " ",
                bs.sizes());
    p.T = bs.size(0);
    const Tensor bsc = bs.contiguous();
    sizes.assign(bsc.const_data_ptr<int64_t>(), bsc.const_data_ptr<int64_t>() + p.T);
    int64_t total = 0;
    for (int64_t t = 0; t < p.T; ++t) {
      TORCH_CHECK(sizes[t] >= 0 && sizes[t] <= p.B, "lstm_fast: batch_sizes values must lie in [0, B=", p.B, "], got ",
                  sizes[t]);
      TORCH_CHECK(t == 0 || sizes[t] <= sizes[t - 1], "lstm_fast: batch_sizes must be non-increasing");
      total += sizes[t];
    }
    TORCH_CHECK(total == p.N, "lstm_fast: packed gx has ", p.N, " rows but batch_sizes sum to ", total);
  } else {
    sizes.assign(p.T, p.B);
  }
  p.reverse = seq.reverse;
  p.order.resize(p.T);
  p.active.resize(p.T);
  p.row0.resize(p.T);
  for (int64_t t = 0, r = 0; t < p.T; r += sizes[t], ++t) p.row0[t] = p.packed ? r : t * p.B;
  for (int64_t s = 0; s < p.T; ++s) {
    p.order[s] = p.reverse ? p.T - 1 - s : s;
    p.active[s] = sizes[p.order[s]];
  }
  return p;
}

at::ScalarType acc_type(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

void check_forward_inputs(const Tensor& gx, const Tensor& h0) {
  TORCH_CHECK(gx.scalar_type() == h0.scalar_type(), "lstm_fast: gx and h0 must share one dtype, got ", gx.scalar_type(),
              " and ", h0.scalar_type());
}

void check_backward_inputs(const Plan& p, const OutputGrads& grads, const Tensor& gates, const Tensor& cells,
                           const Tensor& y, const Tensor& h0) {
  const auto dt = h0.scalar_type(), acc = acc_type(dt);
  auto check = [&](const Tensor& t, at::IntArrayRef sizes, at::ScalarType want, const char* name) {
    TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == want && t.device() == h0.device(), "lstm_fast: ", name,
                " must be ", sizes, " ", want, " on ", h0.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ",
                t.device(), " (gates/cells come from lstm_forward with need_grad=True)");
  };
  check(grads.y, p.step_sizes(p.P), dt, "grad_y");
  check(grads.h_n, {p.B, p.P}, dt, "grad_hn");
  check(grads.c_n, {p.B, p.H}, dt, "grad_cn");
  check(gates, p.step_sizes(4 * p.H), acc, "gates");
  check(cells, p.step_sizes(p.H), acc, "cells");
  check(y, p.step_sizes(p.P), dt, "y");
}

void check_masks(const Plan& p, const StepMasks& masks, const Tensor& h0) {
  auto check = [&](const std::optional<Tensor>& t, at::IntArrayRef sizes, const char* name) {
    if (!StepMasks::on(t)) return;
    TORCH_CHECK(t->sizes() == sizes && t->scalar_type() == h0.scalar_type() && t->device() == h0.device(),
                "lstm_fast: ", name, " must be ", sizes, " ", h0.scalar_type(), " on ", h0.device(), ", got ",
                t->sizes(), " ", t->scalar_type(), " on ", t->device());
  };
  check(masks.recurrent, {p.B, p.P}, "recurrent_mask");
  check(masks.zone_c, p.step_sizes(p.H), "zone_c");
  check(masks.zone_h, p.step_sizes(p.P), "zone_h");
}

Tensor final_hidden(const Tensor& y, const Tensor& h0, const Plan& plan) {
  if (!plan.packed) {
    return plan.T > 0 ? y.select(0, plan.order[plan.T - 1]).clone() : h0.clone();
  }
  Tensor h = h0.clone();
  int64_t later = 0;  // most rows active at any step after s
  for (int64_t s = plan.T - 1; s >= 0; --s) {
    // Rows [later, active[s]) are active for the last time at step s.
    const int64_t n = plan.active[s];
    if (n > later) h.narrow(0, later, n - later).copy_(plan.rows(y, plan.order[s], n).narrow(0, later, n - later));
    later = std::max(later, n);
  }
  return h;
}

// rec_mask [B,P] expanded to every token of a per-step tensor: [1,B,P] padded, [N,P] packed.
static Tensor token_mask(const Tensor& rec_mask, const Plan& plan) {
  if (!plan.packed) return rec_mask.unsqueeze(0);
  Tensor idx = at::empty({plan.N}, at::TensorOptions().dtype(at::kLong));
  int64_t* index = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < plan.T; ++t)
    for (int64_t b = 0, n = plan.active[plan.reverse ? plan.T - 1 - t : t]; b < n; ++b) index[plan.row0[t] + b] = b;
  return rec_mask.index_select(0, idx.to(rec_mask.device()));
}

std::tuple<Tensor, Tensor> weight_grads(const Tensor& d_gates, const Tensor& y, const Tensor& h0, const Tensor& d_r,
                                        const Tensor& h_pre, const Plan& plan, const Tensor& w_hh,
                                        const Tensor& rec_mask) {
  const int64_t G = 4 * plan.H, P = plan.P, T = plan.T;
  Tensor d_w_hh, d_w_hr;
  if (d_r.defined()) {
    d_w_hr = d_r.reshape({-1, P}).t().mm(h_pre.reshape({-1, plan.H}));
  }
  if (rec_mask.defined()) {
    // every previous state entered the product masked by its batch row's mask
    return weight_grads(d_gates, y.mul(token_mask(rec_mask, plan)), h0.mul(rec_mask), d_r, h_pre, plan, w_hh);
  }
  if (plan.packed) {
    // A row's previous state is y of the step before, or its h0 at its first
    // step: gathered from [y; h0] (row N + b is h0[b]), then one GEMM.
    Tensor idx = at::empty({plan.N}, at::TensorOptions().dtype(at::kLong));
    int64_t* index = idx.data_ptr<int64_t>();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = plan.order[s], with_prev = plan.rows_with_prev(s);
      const int64_t prev0 = s > 0 ? plan.row0[plan.order[s - 1]] : 0;
      for (int64_t b = 0; b < plan.active[s]; ++b) index[plan.row0[t] + b] = b < with_prev ? prev0 + b : plan.N + b;
    }
    d_w_hh = d_gates.t().mm(at::cat({y, h0}).index_select(0, idx.to(y.device())));
    return {d_w_hh, d_w_hr};
  }
  if (T == 0) {
    return {at::zeros({G, P}, w_hh.options()), d_r.defined() ? d_w_hr : Tensor()};
  }
  // The first processed step read h0; every later step read y of the step
  // before it, which is y shifted by one along T: two GEMMs, no copy of hprev.
  d_w_hh = d_gates.select(0, plan.order[0]).t().mm(h0);
  if (T > 1) {
    const Tensor dg_rest = plan.reverse ? d_gates.narrow(0, 0, T - 1) : d_gates.narrow(0, 1, T - 1);
    const Tensor y_prev = plan.reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
    d_w_hh.addmm_(dg_rest.reshape({-1, G}).t(), y_prev.reshape({-1, P}));
  }
  return {d_w_hh, d_w_hr};
}

}  // namespace lstm_fast

TORCH_LIBRARY(lstm_fast, m) {
  // Fake (meta) kernels are registered from this Python module.
  m.set_python_module("lstm_fast._ops");
  m.def(
      "lstm_forward(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, bool need_grad, Tensor? recurrent_mask=None, Tensor? zone_c=None, Tensor? zone_h=None) -> "
      "(Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_forward_projected(Tensor x, Tensor w_ih, Tensor? bias, Tensor h0, Tensor c0, Tensor w_hh, "
      "Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool need_grad, Tensor? recurrent_mask=None, "
      "Tensor? zone_c=None, Tensor? zone_h=None) -> "
      "(Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_backward(Tensor grad_y, Tensor grad_hn, Tensor grad_cn, Tensor gates, Tensor cells, Tensor y, "
      "Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "Tensor? recurrent_mask=None, Tensor? zone_c=None, Tensor? zone_h=None) -> "
      "(Tensor d_gx, Tensor d_h0, Tensor d_c0, Tensor d_w_hh, Tensor d_w_hr)");
}

// Lets `import lstm_fast._C` load the library (and so register the ops); the
// module itself is empty. The JIT build loads the same code with
// torch.ops.load_library instead.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
