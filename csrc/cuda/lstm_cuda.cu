// CUDA implementation. Per step: the recurrent GEMM through ATen (cuBLAS on
// the current stream, input dtype in, fp32 out for half/bfloat16), then ONE
// fused kernel for gx add, activations and the state update (forward) or for
// the gate derivatives (backward), their math from lstm_cell.h. One templated
// kernel body per direction serves float64, float32, float16 and bfloat16:
// scalar_t is the storage type, acc_t = at::opmath_type<scalar_t> (float for
// the 16-bit types) is the type of all arithmetic, of the cell state and of
// the saved gates/cells.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
// c10's stream/guard headers, not ATen/cuda/CUDAContext.h: that one needs the
// cuBLAS/cuSPARSE headers, which a minimal CUDA toolkit lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lstm.h"
#include "lstm_cell.h"

namespace lstm_fast {
namespace {

// Threads per block of the pointwise kernels: a common choice for
// memory-bound elementwise kernels; not tuned yet (no GPU measurement so far).
constexpr int kThreads = 256;

// Forward step for n active rows; one thread per (row b, hidden unit j).
//   zg    [n,4H] in: h_{t-1} @ W_hh^T; out: activations i,f,g,o when keep_gates
//         (the saved gates of this step) -- read and written by the same thread
//   gx    [n,4H] input projection rows of step t
//   c     [n,H]  in: c_{t-1}, out: c_t (the fp32/fp64 cell state)
//   h     [n,H]  out: o * tanh(c_t) (rows of y, or the pre-projection buffer)
//   cell  [n,H]  out: c_t saved for backward, or nullptr
template <typename scalar_t, typename acc_t>
__global__ void forward_step_kernel(acc_t* zg, const scalar_t* __restrict__ gx, acc_t* __restrict__ c,
                                    scalar_t* __restrict__ h, acc_t* __restrict__ cell, int64_t n, int64_t H,
                                    bool keep_gates) {
  const int64_t total = n * H;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = e / H, j = e - b * H;
    const int64_t r = b * 4 * H + j;
    const CellForward<acc_t> a = cell_forward<acc_t>(
        zg[r] + static_cast<acc_t>(gx[r]), zg[r + H] + static_cast<acc_t>(gx[r + H]),
        zg[r + 2 * H] + static_cast<acc_t>(gx[r + 2 * H]), zg[r + 3 * H] + static_cast<acc_t>(gx[r + 3 * H]), c[e]);
    c[e] = a.c;
    h[e] = static_cast<scalar_t>(a.h);
    if (cell) cell[e] = a.c;
    if (keep_gates) {
      zg[r] = a.i;
      zg[r + H] = a.f;
      zg[r + 2 * H] = a.g;
      zg[r + 3 * H] = a.o;
    }
  }
}

// Backward step for n active rows; one thread per (row b, hidden unit j).
//   gates [n,4H] saved activations;  cell [n,H] c_t;  cprev [n,H] c_{t-1}
//   dh    [n,H]  gradient reaching h_t (the carried state, or through W_hr)
//   gy    [n,H]  grad_y rows added to dh, or nullptr (projection: already in dh)
//   dc    [n,H]  in: gradient reaching c_t; out: gradient to c_{t-1}
//   dg    [n,4H] out: gate pre-activation gradients (rows of d_gx)
//   hpre  [n,H]  out: o * tanh(c_t) for d_w_hr, or nullptr
template <typename scalar_t, typename acc_t>
__global__ void backward_step_kernel(const acc_t* __restrict__ gates, const acc_t* __restrict__ cell,
                                     const acc_t* __restrict__ cprev, const acc_t* __restrict__ dh,
                                     const scalar_t* __restrict__ gy, acc_t* __restrict__ dc, scalar_t* __restrict__ dg,
                                     scalar_t* __restrict__ hpre, int64_t n, int64_t H) {
  const int64_t total = n * H;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = e / H, j = e - b * H;
    const int64_t r = b * 4 * H + j;
    acc_t d_h = dh[e];
    if (gy) d_h += static_cast<acc_t>(gy[e]);
    const CellBackward<acc_t> d =
        cell_backward<acc_t>(gates[r], gates[r + H], gates[r + 2 * H], gates[r + 3 * H], cell[e], cprev[e], d_h, dc[e]);
    dg[r] = static_cast<scalar_t>(d.di);
    dg[r + H] = static_cast<scalar_t>(d.df);
    dg[r + 2 * H] = static_cast<scalar_t>(d.dg);
    dg[r + 3 * H] = static_cast<scalar_t>(d.do_);
    dc[e] = d.dc_prev;
    if (hpre) hpre[e] = static_cast<scalar_t>(d.h_pre);
  }
}

// out [m] = a [m] (acc_t) + b [m] (scalar_t), stored as scalar_t: d_r = dh + grad_y.
template <typename scalar_t, typename acc_t>
__global__ void add_kernel(const acc_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                           int64_t m) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < m; e += (int64_t)gridDim.x * blockDim.x) {
    out[e] = static_cast<scalar_t>(a[e] + static_cast<acc_t>(b[e]));
  }
}

unsigned int blocks_for(int64_t total) {
  // Grid-stride loops cover any total; the cap only bounds the grid size.
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20)));
}

// out = a @ w_op on the current stream; out may be wider (fp32) than a and w_op
// (half/bfloat16): cuBLAS accumulates in fp32 and rounds only once, or never.
void gemm(const Tensor& a, const Tensor& w_op, Tensor& out) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, w_op);
  } else {
    at::mm_out(out, a, w_op, out.scalar_type());
  }
}

// Outputs and scratch of one forward call (acc_t: see the top of this file).
struct ForwardBuffers {
  Tensor y;             // [T,B,P] out (per-step tensors: [N,*] when packed, see Plan)
  Tensor c;             // [B,H] acc_t, in: c0, out: c_n
  Tensor gates, cells;  // [T,B,4H], [T,B,H] acc_t out, or [0] when need_grad is off
  Tensor z;             // [B,4H] acc_t scratch when need_grad is off
  Tensor hpre;          // [B,H] scratch with a projection
  bool need_grad = false;
  // Regularisers (StepMasks, lstm.h), undefined when off: rmask [B,P]; zc, zh
  // per step, all in acc_t. Applied with ATen ops around the step's kernel.
  Tensor rmask, zc, zh;
};

// The first n rows of h_{t-1} at step s: the previous step's y, h0 for rows starting here.
Tensor previous_h(const Plan& p, const Tensor& y, const Tensor& h0, int64_t s, int64_t n) {
  const int64_t with_prev = p.rows_with_prev(s);
  if (with_prev == 0) return h0.narrow(0, 0, n);
  const Tensor prev = p.rows(y, p.order[s - 1], with_prev);
  return with_prev < n ? at::cat({prev, h0.narrow(0, with_prev, n - with_prev)}) : prev;
}

// Forward over all steps: gx [T,B,4H], h0 [B,P] and contiguous weights w.
template <typename scalar_t>
void forward_stepwise(const Plan& p, const Tensor& gx, const Tensor& h0, const RecurrentWeights& w,
                      ForwardBuffers& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = p.H;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool proj = w.has_proj();
  const Tensor w_hh_t = w.w_hh.t();
  const Tensor w_hr_t = proj ? w.w_hr->t() : Tensor();
  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.order[s], n = p.active[s];
    if (n == 0) continue;
    // h_{t-1}: the previous step's output, and h0 for rows starting at this step
    const int64_t with_prev = p.rows_with_prev(s);
    Tensor zt = out.need_grad ? p.rows(out.gates, t, n) : out.z.narrow(0, 0, n);
    const bool zoned = out.zc.defined() || out.zh.defined();
    const Tensor h_prev = zoned || out.rmask.defined() ? previous_h(p, out.y, h0, s, n) : Tensor();
    const Tensor c_prev = out.zc.defined() ? out.c.narrow(0, 0, n).clone() : Tensor();
    if (out.rmask.defined()) {
      gemm(h_prev.mul(out.rmask.narrow(0, 0, n)).to(h_prev.scalar_type()), w_hh_t, zt);
    } else if (with_prev > 0) {
      Tensor z_prev = zt.narrow(0, 0, with_prev);
      gemm(p.rows(out.y, p.order[s - 1], with_prev), w_hh_t, z_prev);
    }
    if (!out.rmask.defined() && n > with_prev) {
      Tensor z_new = zt.narrow(0, with_prev, n - with_prev);
      gemm(h0.narrow(0, with_prev, n - with_prev), w_hh_t, z_new);
    }
    Tensor hout = proj ? out.hpre.narrow(0, 0, n) : p.rows(out.y, t, n);
    forward_step_kernel<scalar_t, acc_t><<<blocks_for(n * H), kThreads, 0, stream>>>(
        zt.data_ptr<acc_t>(), p.rows(gx, t, n).const_data_ptr<scalar_t>(), out.c.data_ptr<acc_t>(),
        hout.data_ptr<scalar_t>(), out.need_grad ? p.rows(out.cells, t, n).data_ptr<acc_t>() : nullptr, n, H,
        out.need_grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (proj) {
      Tensor yt = p.rows(out.y, t, n);
      gemm(hout, w_hr_t, yt);
    }
    if (out.zc.defined()) {  // c_t = c~_t + zc (c_{t-1} - c~_t); the saved cells hold c_t
      Tensor ct = out.c.narrow(0, 0, n);
      ct.add_(p.rows(out.zc, t, n).mul(c_prev.sub(ct)));
      if (out.need_grad) p.rows(out.cells, t, n).copy_(ct);
    }
    if (out.zh.defined()) {
      Tensor yt = p.rows(out.y, t, n);
      const Tensor y_acc = yt.to(out.zh.scalar_type());
      yt.copy_(y_acc.add(p.rows(out.zh, t, n).mul(h_prev.to(y_acc.scalar_type()).sub(y_acc))));
    }
  }
}

// Outputs and scratch of one backward call.
struct BackwardBuffers {
  Tensor dh;             // [B,P] acc_t, in: grad_hn, out: d_h0
  Tensor dc;             // [B,H] acc_t, in: grad_cn, out: d_c0
  Tensor d_gx;           // [T,B,4H] out
  Tensor d_r, hpre;      // [T,B,P], [T,B,H] out, with a projection
  Tensor dhbuf;          // [B,H] acc_t scratch, with a projection
  Tensor rmask, zc, zh;  // as in ForwardBuffers
};

// Backward over all steps, processing order reversed: grad_y [T,B,P]; gates
// [T,B,4H], cells [T,B,H] and c0 [B,H] acc_t; contiguous weights w.
template <typename scalar_t>
void backward_stepwise(const Plan& p, const Tensor& grad_y, const Tensor& gates, const Tensor& cells, const Tensor& c0,
                       const RecurrentWeights& w, BackwardBuffers& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = p.H, P = p.P;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool proj = w.has_proj();
  for (int64_t s = p.T - 1; s >= 0; --s) {
    const int64_t t = p.order[s], n = p.active[s];
    if (n == 0) continue;
    // c_{t-1}: the previous step's cells, and c0 for rows starting at this step
    const int64_t with_prev = p.rows_with_prev(s);
    Tensor cprev = with_prev > 0 ? p.rows(cells, p.order[s - 1], with_prev) : c0;
    if (with_prev > 0 && with_prev < n) cprev = at::cat({cprev, c0.narrow(0, with_prev, n - with_prev)});
    const scalar_t* gy = p.rows(grad_y, t, n).const_data_ptr<scalar_t>();
    const acc_t* dh_in = out.dh.const_data_ptr<acc_t>();
    Tensor carry, dh_total;  // hidden zoneout: zh * (gradient reaching h_t) goes straight to h_{t-1}
    if (out.zh.defined() && !proj) {
      const Tensor total = out.dh.narrow(0, 0, n).add(p.rows(grad_y, t, n).to(out.dh.scalar_type()));
      carry = p.rows(out.zh, t, n).mul(total);
      dh_total = total.sub(carry).contiguous();
      dh_in = dh_total.const_data_ptr<acc_t>();
      gy = nullptr;
    }
    if (proj) {
      Tensor drt = p.rows(out.d_r, t, n);
      add_kernel<scalar_t, acc_t>
          <<<blocks_for(n * P), kThreads, 0, stream>>>(dh_in, gy, drt.data_ptr<scalar_t>(), n * P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (out.zh.defined()) {
        carry = p.rows(out.zh, t, n).mul(drt.to(out.zh.scalar_type()));
        drt.sub_(carry.to(drt.scalar_type()));
      }
      Tensor dhb = out.dhbuf.narrow(0, 0, n);
      gemm(drt, *w.w_hr, dhb);
      dh_in = out.dhbuf.const_data_ptr<acc_t>();
      gy = nullptr;
    }
    Tensor dgt = p.rows(out.d_gx, t, n);
    Tensor cell_t = p.rows(cells, t, n), dc_t;
    const Tensor gt = p.rows(gates, t, n);
    if (out.zc.defined()) {
      // cells hold c_t; the gates saw c~_t = f c_{t-1} + i g, which gets (1 - zc) of dc_t
      cell_t = gt.narrow(1, H, H).mul(cprev.narrow(0, 0, n)).add(gt.narrow(1, 0, H).mul(gt.narrow(1, 2 * H, H)));
      dc_t = out.dc.narrow(0, 0, n).clone();
      out.dc.narrow(0, 0, n).sub_(p.rows(out.zc, t, n).mul(dc_t));
    }
    backward_step_kernel<scalar_t, acc_t><<<blocks_for(n * H), kThreads, 0, stream>>>(
        gt.const_data_ptr<acc_t>(), cell_t.const_data_ptr<acc_t>(), cprev.const_data_ptr<acc_t>(), dh_in, gy,
        out.dc.data_ptr<acc_t>(), dgt.data_ptr<scalar_t>(),
        proj ? p.rows(out.hpre, t, n).data_ptr<scalar_t>() : nullptr, n, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (out.zc.defined()) out.dc.narrow(0, 0, n).add_(p.rows(out.zc, t, n).mul(dc_t));
    Tensor dht = out.dh.narrow(0, 0, n);
    gemm(dgt, w.w_hh, dht);  // dh_{t-1} = dgates @ W_hh
    if (out.rmask.defined()) dht.mul_(out.rmask.narrow(0, 0, n));
    if (carry.defined()) dht.add_(carry);
  }
}

void check_cuda(const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "lstm_fast cuda: expected CUDA tensors, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "lstm_fast cuda: float64/32/16 and bfloat16 only, got ", dt);
}

}  // namespace

// A mask in the accumulation type, or undefined when off.
Tensor acc_mask(const std::optional<Tensor>& t, at::ScalarType acc) {
  return StepMasks::on(t) ? t->to(acc).contiguous() : Tensor();
}

Tensor5 lstm_forward_cuda(const Tensor& gx_, const LSTMState& init, const RecurrentWeights& w_,
                          const SequenceLayout& seq, bool need_grad, const StepMasks& masks) {
  const Plan p = make_plan(gx_, init, w_, seq);
  check_masks(p, masks, init.h);
  check_forward_inputs(gx_, init.h);
  check_cuda(gx_);
  const c10::cuda::CUDAGuard guard(gx_.device());
  const bool proj = w_.has_proj();
  const Tensor gx = gx_.contiguous(), h0 = init.h.contiguous();
  const RecurrentWeights w{w_.w_hh.contiguous(), proj ? std::optional<Tensor>(w_.w_hr->contiguous()) : std::nullopt};
  const auto opts = gx.options();
  const auto acc_opts = opts.dtype(acc_type(gx.scalar_type()));
  const int64_t B = p.B, H = p.H, P = p.P, G = 4 * H;
  ForwardBuffers out;
  out.y = at::empty(p.step_sizes(P), opts);
  out.c = init.c.to(acc_opts.dtype(), /*non_blocking=*/false, /*copy=*/true).contiguous();
  out.gates = need_grad ? at::empty(p.step_sizes(G), acc_opts) : at::empty({0}, acc_opts);
  out.cells = need_grad ? at::empty(p.step_sizes(H), acc_opts) : at::empty({0}, acc_opts);
  out.z = need_grad ? Tensor() : at::empty({B, G}, acc_opts);
  out.hpre = proj ? at::empty({B, H}, opts) : Tensor();
  out.need_grad = need_grad;
  out.rmask = acc_mask(masks.recurrent, acc_type(gx.scalar_type()));
  out.zc = acc_mask(masks.zone_c, acc_type(gx.scalar_type()));
  out.zh = acc_mask(masks.zone_h, acc_type(gx.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "lstm_forward_cuda",
                                  [&] { forward_stepwise<scalar_t>(p, gx, h0, w, out); });
  Tensor h_n = final_hidden(out.y, h0, p);
  Tensor c_n = out.c.to(gx.scalar_type(), false, /*copy=*/out.c.scalar_type() != gx.scalar_type());
  return {out.y, h_n, c_n, out.gates, out.cells};
}

Tensor5 lstm_backward_cuda(const OutputGrads& grads, const Tensor& gates_, const Tensor& cells_, const Tensor& y_,
                           const LSTMState& init, const RecurrentWeights& w_, const SequenceLayout& seq,
                           const StepMasks& masks) {
  const Plan p = make_plan(gates_, init, w_, seq);
  check_backward_inputs(p, grads, gates_, cells_, y_, init.h);
  check_masks(p, masks, init.h);
  check_cuda(init.h);
  const c10::cuda::CUDAGuard guard(init.h.device());
  const bool proj = w_.has_proj();
  const auto dt = init.h.scalar_type();
  const Tensor grad_y = grads.y.contiguous(), gates = gates_.contiguous(), cells = cells_.contiguous();
  const Tensor y = y_.contiguous(), h0 = init.h.contiguous();
  const RecurrentWeights w{w_.w_hh.contiguous(), proj ? std::optional<Tensor>(w_.w_hr->contiguous()) : std::nullopt};
  const auto opts = h0.options();
  const auto acc_opts = opts.dtype(acc_type(dt));
  const int64_t B = p.B, H = p.H, P = p.P, G = 4 * H;
  BackwardBuffers out;
  out.d_gx = at::empty(p.step_sizes(G), opts);
  out.dh = grads.h_n.to(acc_opts.dtype(), false, /*copy=*/true).contiguous();
  out.dc = grads.c_n.to(acc_opts.dtype(), false, /*copy=*/true).contiguous();
  const Tensor c0 = init.c.to(acc_opts.dtype()).contiguous();
  out.d_r = proj ? at::empty(p.step_sizes(P), opts) : Tensor();
  out.hpre = proj ? at::empty(p.step_sizes(H), opts) : Tensor();
  out.dhbuf = proj ? at::empty({B, H}, acc_opts) : Tensor();
  const auto acc = acc_type(dt);
  out.rmask = acc_mask(masks.recurrent, acc);
  out.zc = acc_mask(masks.zone_c, acc);
  out.zh = acc_mask(masks.zone_h, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "lstm_backward_cuda",
                                  [&] { backward_stepwise<scalar_t>(p, grad_y, gates, cells, c0, w, out); });
  const Tensor rmask = StepMasks::on(masks.recurrent) ? masks.recurrent->contiguous() : Tensor();
  auto [d_w_hh, d_w_hr] = weight_grads(out.d_gx, y, h0, out.d_r, out.hpre, p, w.w_hh, rmask);
  if (!proj) d_w_hr = at::empty({0}, opts);
  const Tensor &dh = out.dh, &dc = out.dc;
  return {out.d_gx, dh.to(dt, false, dh.scalar_type() != dt), dc.to(dt, false, dc.scalar_type() != dt), d_w_hh, d_w_hr};
}

}  // namespace lstm_fast

TORCH_LIBRARY_IMPL(lstm_fast, CUDA, m) {
  m.impl("lstm_forward", &lstm_fast::forward_op<lstm_fast::lstm_forward_cuda>);
  m.impl("lstm_backward", &lstm_fast::backward_op<lstm_fast::lstm_backward_cuda>);
}
