// CUDA implementation. Per step: the recurrent GEMM through ATen (cuBLAS on
// the current stream, input dtype in, fp32 out for half/bfloat16), then ONE
// fused kernel for gx add, activations and the state update (forward) or for
// the gate derivatives (backward). One templated kernel body per direction
// serves float64, float32, float16 and bfloat16: scalar_t is the storage type,
// acc_t = at::opmath_type<scalar_t> (float for the 16-bit types) is the type
// of all arithmetic, of the cell state and of the saved gates/cells.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
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

namespace lstm_fast {
namespace {

// Threads per block of the pointwise kernels: a common choice for
// memory-bound elementwise kernels; not tuned yet (no GPU measurement so far).
constexpr int kThreads = 256;

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }
template <typename T>
__device__ __forceinline__ T sigmoid_(T x) {
  return T(1) / (T(1) + exp_(-x));
}

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
    const acc_t i = sigmoid_(zg[r] + static_cast<acc_t>(gx[r]));
    const acc_t f = sigmoid_(zg[r + H] + static_cast<acc_t>(gx[r + H]));
    const acc_t g = tanh_(zg[r + 2 * H] + static_cast<acc_t>(gx[r + 2 * H]));
    const acc_t o = sigmoid_(zg[r + 3 * H] + static_cast<acc_t>(gx[r + 3 * H]));
    const acc_t cn = f * c[e] + i * g;
    c[e] = cn;
    h[e] = static_cast<scalar_t>(o * tanh_(cn));
    if (cell) cell[e] = cn;
    if (keep_gates) {
      zg[r] = i;
      zg[r + H] = f;
      zg[r + 2 * H] = g;
      zg[r + 3 * H] = o;
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
    const acc_t i = gates[r], f = gates[r + H], g = gates[r + 2 * H], o = gates[r + 3 * H];
    const acc_t tc = tanh_(cell[e]);
    acc_t d_h = dh[e];
    if (gy) d_h += static_cast<acc_t>(gy[e]);
    const acc_t d_c = dc[e] + d_h * o * (acc_t(1) - tc * tc);
    dg[r] = static_cast<scalar_t>(d_c * g * i * (acc_t(1) - i));
    dg[r + H] = static_cast<scalar_t>(d_c * cprev[e] * f * (acc_t(1) - f));
    dg[r + 2 * H] = static_cast<scalar_t>(d_c * i * (acc_t(1) - g * g));
    dg[r + 3 * H] = static_cast<scalar_t>(d_h * tc * o * (acc_t(1) - o));
    dc[e] = d_c * f;
    if (hpre) hpre[e] = static_cast<scalar_t>(o * tc);
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

// Which CUDA algorithm runs a call. Only the per-step one exists; a persistent
// kernel (weights resident in shared memory/registers across steps) is the
// planned second entry, chosen here by measured size thresholds.
enum class Algo { kStepwise, kPersistent };

Algo choose_algo(const Plan&, at::ScalarType) { return Algo::kStepwise; }

// Forward over all steps. Tensors: gx [T,B,4H], h0 [B,P] (scalar_t);
// c [B,H] acc_t in: c0, out: c_n; w_hh [4H,P], w_hr [P,H] or undefined;
// y [T,B,P] out; gates [T,B,4H], cells [T,B,H] acc_t out or [0] (need_grad off);
// z [B,4H] acc_t scratch (inference); hpre [B,H] scalar_t scratch (projection).
template <typename scalar_t>
void forward_stepwise(const Plan& p, const Tensor& gx, const Tensor& h0, Tensor& c, const Tensor& w_hh,
                      const Tensor& w_hr, Tensor& y, Tensor& gates, Tensor& cells, Tensor& z, Tensor& hpre,
                      bool need_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = p.B, H = p.H, P = p.P;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Tensor w_hh_t = w_hh.t();
  const Tensor w_hr_t = w_hr.defined() ? w_hr.t() : Tensor();
  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.order[s], n = p.active[s];
    if (n == 0) break;  // active only shrinks
    const Tensor hprev = (s == 0 ? h0 : y.select(0, p.order[s - 1])).narrow(0, 0, n);
    Tensor zt = (need_grad ? gates.select(0, t) : z).narrow(0, 0, n);
    gemm(hprev, w_hh_t, zt);
    Tensor hout = (w_hr.defined() ? hpre : y.select(0, t)).narrow(0, 0, n);
    forward_step_kernel<scalar_t, acc_t><<<blocks_for(n * H), kThreads, 0, stream>>>(
        zt.data_ptr<acc_t>(), gx.select(0, t).const_data_ptr<scalar_t>(), c.data_ptr<acc_t>(),
        hout.data_ptr<scalar_t>(), need_grad ? cells.select(0, t).data_ptr<acc_t>() : nullptr, n, H, need_grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (w_hr.defined()) {
      Tensor yt = y.select(0, t).narrow(0, 0, n);
      gemm(hout, w_hr_t, yt);
    }
  }
  (void)B;
  (void)P;
}

// Backward over all steps, processing order reversed. Tensors: grad_y [T,B,P];
// dh [B,P] acc_t in: grad_hn, out: d_h0; dc [B,H] acc_t in: grad_cn, out: d_c0;
// gates [T,B,4H], cells [T,B,H] acc_t; c0 [B,H] acc_t; w_hh [4H,P], w_hr [P,H]
// or undefined; d_gx [T,B,4H] out; d_r [T,B,P], hpre [T,B,H] out and dhbuf
// [B,H] acc_t scratch only with w_hr.
template <typename scalar_t>
void backward_stepwise(const Plan& p, const Tensor& grad_y, Tensor& dh, Tensor& dc, const Tensor& gates,
                       const Tensor& cells, const Tensor& c0, const Tensor& w_hh, const Tensor& w_hr, Tensor& d_gx,
                       Tensor& d_r, Tensor& hpre, Tensor& dhbuf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = p.H, P = p.P;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool proj = w_hr.defined();
  for (int64_t s = p.T - 1; s >= 0; --s) {
    const int64_t t = p.order[s], n = p.active[s];
    if (n == 0) continue;
    const Tensor cprev = s == 0 ? c0 : cells.select(0, p.order[s - 1]);
    const scalar_t* gy = grad_y.select(0, t).const_data_ptr<scalar_t>();
    const acc_t* dh_in = dh.const_data_ptr<acc_t>();
    if (proj) {
      Tensor drt = d_r.select(0, t).narrow(0, 0, n);
      add_kernel<scalar_t, acc_t>
          <<<blocks_for(n * P), kThreads, 0, stream>>>(dh_in, gy, drt.data_ptr<scalar_t>(), n * P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Tensor dhb = dhbuf.narrow(0, 0, n);
      gemm(drt, w_hr, dhb);
      dh_in = dhbuf.const_data_ptr<acc_t>();
      gy = nullptr;
    }
    Tensor dgt = d_gx.select(0, t).narrow(0, 0, n);
    backward_step_kernel<scalar_t, acc_t><<<blocks_for(n * H), kThreads, 0, stream>>>(
        gates.select(0, t).const_data_ptr<acc_t>(), cells.select(0, t).const_data_ptr<acc_t>(),
        cprev.const_data_ptr<acc_t>(), dh_in, gy, dc.data_ptr<acc_t>(), dgt.data_ptr<scalar_t>(),
        proj ? hpre.select(0, t).data_ptr<scalar_t>() : nullptr, n, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor dht = dh.narrow(0, 0, n);
    gemm(dgt, w_hh, dht);  // dh_{t-1} = dgates @ W_hh
  }
}

void check_cuda(const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "lstm_fast cuda: expected CUDA tensors, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "lstm_fast cuda: float64/32/16 and bfloat16 only, got ", dt);
}

}  // namespace

Tensor5 lstm_forward_cuda(const Tensor& gx_, const Tensor& h0_, const Tensor& c0_, const Tensor& w_hh_,
                          const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& batch_sizes, bool reverse,
                          bool need_grad) {
  const Plan p = make_plan(gx_, h0_, c0_, w_hh_, w_hr_, batch_sizes, reverse);
  check_forward_inputs(gx_, h0_);
  check_cuda(gx_);
  const c10::cuda::CUDAGuard guard(gx_.device());
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  const Tensor gx = gx_.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  const auto opts = gx.options();
  const auto acc_opts = opts.dtype(acc_type(gx.scalar_type()));
  const int64_t T = p.T, B = p.B, H = p.H, P = p.P, G = 4 * H;
  auto alloc = [&](at::IntArrayRef sizes, const at::TensorOptions& o) {
    return p.packed ? at::zeros(sizes, o) : at::empty(sizes, o);
  };
  Tensor y = alloc({T, B, P}, opts);
  Tensor c = c0_.to(acc_opts.dtype(), /*non_blocking=*/false, /*copy=*/true).contiguous();
  Tensor gates = need_grad ? alloc({T, B, G}, acc_opts) : at::empty({0}, acc_opts);
  Tensor cells = need_grad ? alloc({T, B, H}, acc_opts) : at::empty({0}, acc_opts);
  Tensor z = need_grad ? Tensor() : at::empty({B, G}, acc_opts);
  Tensor hpre = proj ? at::empty({B, H}, opts) : Tensor();
  switch (choose_algo(p, gx.scalar_type())) {
    case Algo::kStepwise:
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "lstm_forward_cuda", [&] {
        forward_stepwise<scalar_t>(p, gx, h0, c, w_hh, w_hr, y, gates, cells, z, hpre, need_grad);
      });
      break;
    case Algo::kPersistent: TORCH_CHECK(false, "lstm_fast cuda: the persistent kernel is not available in this build");
  }
  Tensor h_n = final_hidden(y, h0, p);
  Tensor c_n = c.to(gx.scalar_type(), false, /*copy=*/c.scalar_type() != gx.scalar_type());
  return {y, h_n, c_n, gates, cells};
}

Tensor5 lstm_backward_cuda(const Tensor& grad_y_, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& gates_,
                           const Tensor& cells_, const Tensor& y_, const Tensor& h0_, const Tensor& c0_,
                           const Tensor& w_hh_, const std::optional<Tensor>& w_hr_,
                           const std::optional<Tensor>& batch_sizes, bool reverse) {
  const Plan p = make_plan(gates_, h0_, c0_, w_hh_, w_hr_, batch_sizes, reverse);
  check_backward_inputs(p, grad_y_, grad_hn, grad_cn, gates_, cells_, y_, h0_);
  check_cuda(h0_);
  const c10::cuda::CUDAGuard guard(h0_.device());
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  const auto dt = h0_.scalar_type();
  const Tensor grad_y = grad_y_.contiguous(), gates = gates_.contiguous(), cells = cells_.contiguous();
  const Tensor y = y_.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  const auto opts = h0.options();
  const auto acc_opts = opts.dtype(acc_type(dt));
  const int64_t T = p.T, B = p.B, H = p.H, P = p.P, G = 4 * H;
  auto alloc = [&](at::IntArrayRef sizes) { return p.packed ? at::zeros(sizes, opts) : at::empty(sizes, opts); };
  Tensor d_gx = alloc({T, B, G});
  Tensor dh = grad_hn.to(acc_opts.dtype(), false, /*copy=*/true).contiguous();
  Tensor dc = grad_cn.to(acc_opts.dtype(), false, /*copy=*/true).contiguous();
  Tensor c0 = c0_.to(acc_opts.dtype()).contiguous();
  Tensor d_r = proj ? alloc({T, B, P}) : Tensor();
  Tensor hpre = proj ? alloc({T, B, H}) : Tensor();
  Tensor dhbuf = proj ? at::empty({B, H}, acc_opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "lstm_backward_cuda", [&] {
    backward_stepwise<scalar_t>(p, grad_y, dh, dc, gates, cells, c0, w_hh, w_hr, d_gx, d_r, hpre, dhbuf);
  });
  auto [d_w_hh, d_w_hr] = weight_grads(d_gx, y, h0, d_r, hpre, p, w_hh);
  if (!proj) d_w_hr = at::empty({0}, opts);
  return {d_gx, dh.to(dt, false, dh.scalar_type() != dt), dc.to(dt, false, dc.scalar_type() != dt), d_w_hh, d_w_hr};
}

}  // namespace lstm_fast

TORCH_LIBRARY_IMPL(lstm_fast, CUDA, m) {
  m.impl("lstm_forward", &lstm_fast::lstm_forward_cuda);
  m.impl("lstm_backward", &lstm_fast::lstm_backward_cuda);
}
