// CPU implementation: the whole time loop in C++. Per step, one BLAS GEMM for
// the recurrent product, then one fused, vectorised pass over the batch rows
// (parallel with at::parallel_for) for activations and the state update.
// Backward mirrors it; the weight gradients are GEMMs over all T afterwards.

// Use ATen's AVX2 Vectorized (and its Sleef exp/tanh) when the compiler was
// told the target has AVX2+FMA (build_config.py adds -mavx2 -mfma only when the
// building machine has them); otherwise Vectorized is ATen's portable version.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "lstm.h"

// The BLAS inside libtorch_cpu (what at::mm calls). Weak: a torch build that
// does not export them leaves these null and gemm_rm() falls back to at::mm_out.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's per-thread override of its thread count (0 = back to the global one;
// the C entry point: the lower-case symbol is the Fortran one, taking int*);
// returns the previous override. Weak: absent when torch's BLAS is not MKL.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace lstm_fast {
namespace {

using at::vec::Vectorized;

// Direct BLAS skips at::mm_out's per-call dispatch and checks, a few
// microseconds that matter at B=1 (one GEMV per step). LSTM_FAST_CPU_GEMM=aten
// forces the at::mm_out path (to compare the two, or if the BLAS misbehaves).
bool use_direct_blas() {
  static const bool direct = [] {
    const char* env = std::getenv("LSTM_FAST_CPU_GEMM");
    return !(env && std::strcmp(env, "aten") == 0) && sgemm_ != nullptr && dgemm_ != nullptr;
  }();
  return direct;
}

void blas_gemm(const char* ta, const char* tb, int m, int n, int k, const float* a, int lda, const float* b,
               int ldb, float* c, int ldc) {
  const float one = 1.f, zero = 0.f;
  sgemm_(ta, tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
}
void blas_gemm(const char* ta, const char* tb, int m, int n, int k, const double* a, int lda, const double* b,
               int ldb, double* c, int ldc) {
  const double one = 1.0, zero = 0.0;
  dgemm_(ta, tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
}

// Row-major c[n, m] = a[n, k] @ W^T with w [m, k] (w_is_mk) or a @ W with
// w [k, m] (!w_is_mk). All contiguous; c must not alias a or w.
template <typename T>
void gemm_rm(int64_t n, int64_t m, int64_t k, const T* a, const T* w, bool w_is_mk, T* c) {
  if (n == 0) return;
  if (use_direct_blas()) {
    // Column-major view: c^T[m, n] = op(w)[m, k] @ a^T[k, n].
    blas_gemm(w_is_mk ? "T" : "N", "N", (int)m, (int)n, (int)k, w, (int)(w_is_mk ? k : m), a, (int)k, c,
              (int)m);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor ct = at::from_blob(c, {n, m}, opts);
  const at::Tensor at_ = at::from_blob(const_cast<T*>(a), {n, k}, opts);
  const at::Tensor wt = w_is_mk ? at::from_blob(const_cast<T*>(w), {m, k}, opts).t()
                                : at::from_blob(const_cast<T*>(w), {k, m}, opts);
  at::mm_out(ct, at_, wt);
}

// float: ATen's inline polynomial exp_u20 (<= 20 ulp, no Sleef call) for both
// sigmoid and tanh; the activations then cost a small part of a step next to
// the GEMM. double: Sleef's 1-ulp exp/tanh (float64 is for exactness).
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return one / (one + vexp(x.neg()));
}

// tanh(x) = 2 sigmoid(2x) - 1 for float (absolute error ~1e-7 near 0).
template <typename T>
inline Vectorized<T> vtanh(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    const Vectorized<T> two(T(2));
    return two * sigmoid(two * x) - Vectorized<T>(T(1));
  } else {
    return x.tanh();
  }
}

// One row of the forward step, j over H in vector chunks (tail by count).
//   z    [4H] in: h_{t-1} @ W_hh^T; out: activations i,f,g,o when keep_gates
//   gx   [4H] input projection of this row and step
//   c    [H]  in: c_{t-1}, out: c_t (in place)
//   h    [H]  out: o * tanh(c_t) (y row, or the pre-projection buffer)
//   cell [H]  out: copy of c_t, or nullptr
// h, cell, c, z, gx: distinct buffers.
template <typename T>
void forward_row(T* z, const T* gx, T* c, T* h, T* cell, int64_t H, bool keep_gates) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  for (int64_t j = 0; j < H; j += L) {
    const int64_t cnt = std::min<int64_t>(L, H - j);
    const V i = sigmoid(V::loadu(z + j, cnt) + V::loadu(gx + j, cnt));
    const V f = sigmoid(V::loadu(z + H + j, cnt) + V::loadu(gx + H + j, cnt));
    const V g = vtanh(V::loadu(z + 2 * H + j, cnt) + V::loadu(gx + 2 * H + j, cnt));
    const V o = sigmoid(V::loadu(z + 3 * H + j, cnt) + V::loadu(gx + 3 * H + j, cnt));
    const V cn = at::vec::fmadd(f, V::loadu(c + j, cnt), i * g);
    const V hn = o * vtanh(cn);
    cn.store(c + j, cnt);
    hn.store(h + j, cnt);
    if (cell) cn.store(cell + j, cnt);
    if (keep_gates) {
      i.store(z + j, cnt);
      f.store(z + H + j, cnt);
      g.store(z + 2 * H + j, cnt);
      o.store(z + 3 * H + j, cnt);
    }
  }
}

// One row of the backward step.
//   gates [4H] activations i,f,g,o of this step;  cell [H] c_t;  cprev [H] c_{t-1}
//   dh    [H]  gradient reaching h_t (before the projection); gy [H] added to
//              it when not null (no projection: dh is the carried state)
//   dc    [H]  in: gradient reaching c_t from later steps; out: to c_{t-1}
//   dg    [4H] out: gradient of the gate pre-activations (= d_gx row)
//   hpre  [H]  out: o * tanh(c_t) for d_w_hr, or nullptr
template <typename T>
void backward_row(const T* gates, const T* cell, const T* cprev, const T* dh, const T* gy, T* dc, T* dg, T* hpre,
                  int64_t H) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V one(T(1));
  for (int64_t j = 0; j < H; j += L) {
    const int64_t cnt = std::min<int64_t>(L, H - j);
    const V i = V::loadu(gates + j, cnt), f = V::loadu(gates + H + j, cnt);
    const V g = V::loadu(gates + 2 * H + j, cnt), o = V::loadu(gates + 3 * H + j, cnt);
    const V tc = vtanh(V::loadu(cell + j, cnt));
    V d_h = V::loadu(dh + j, cnt);
    if (gy) d_h = d_h + V::loadu(gy + j, cnt);
    const V d_c = at::vec::fmadd(d_h * o, one - tc * tc, V::loadu(dc + j, cnt));
    (d_c * g * i * (one - i)).store(dg + j, cnt);
    (d_c * V::loadu(cprev + j, cnt) * f * (one - f)).store(dg + H + j, cnt);
    (d_c * i * (one - g * g)).store(dg + 2 * H + j, cnt);
    (d_h * tc * o * (one - o)).store(dg + 3 * H + j, cnt);
    (d_c * f).store(dc + j, cnt);
    if (hpre) (o * tc).store(hpre + j, cnt);
  }
}

// The per-step GEMMs run on one thread: on the 2-core build machine (cores
// shared with other work) 2 BLAS threads per step made whole training runs
// 2-5x slower than 1 (T=100, B=32, H=256: 2816 vs ~500 ms), a barrier per step
// waiting on a descheduled thread. The big GEMMs after the loop keep all threads.
struct SingleThreadedBlas {
  int prev = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
};

// Rows per parallel chunk of the pointwise pass: at least 16K gate elements.
// Of the benchmark shapes only T=100,B=32,H=256 splits (2 chunks); split vs
// serial differed by less than the noise of the shared 2-core machine there.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / (4 * H)); }

// Forward time loop. Pointers (all contiguous, distinct unless noted):
//   gx [T,B,4H]; h0 [B,P]; c [B,H] in: c0, out: c_n (inactive rows keep theirs)
//   w_hh [4H,P]; w_hr [P,H] or nullptr
//   y [T,B,P] out (inactive rows untouched, pre-zeroed by the caller)
//   gates [T,B,4H] out or nullptr; cells [T,B,H] out or nullptr (both or none)
//   z [B,4H] scratch when gates is null; hpre [B,H] scratch when w_hr is set
template <typename T>
void forward_loop(const Plan& p, const T* gx, const T* h0, T* c, const T* w_hh, const T* w_hr, T* y, T* gates,
                  T* cells, T* z, T* hpre) {
  const int64_t B = p.B, H = p.H, P = p.P, G = 4 * H;
  const SingleThreadedBlas blas_threads;
  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.order[s], n = p.active[s];
    if (n == 0) break;  // active only shrinks
    const T* hprev = s == 0 ? h0 : y + p.order[s - 1] * B * P;
    T* zt = gates ? gates + t * B * G : z;
    gemm_rm<T>(n, G, P, hprev, w_hh, /*w_is_mk=*/true, zt);
    T* hout = w_hr ? hpre : y + t * B * P;
    const T* gxt = gx + t * B * G;
    T* cellt = cells ? cells + t * B * H : nullptr;
    at::parallel_for(0, n, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        forward_row<T>(zt + b * G, gxt + b * G, c + b * H, hout + b * H, cellt ? cellt + b * H : nullptr, H,
                       gates != nullptr);
      }
    });
    if (w_hr) gemm_rm<T>(n, P, H, hpre, w_hr, /*w_is_mk=*/true, y + t * B * P);
  }
}

// Backward time loop, processing order reversed. Pointers (contiguous, distinct):
//   grad_y [T,B,P]; dh [B,P] in: grad_hn, out: d_h0; dc [B,H] in: grad_cn, out: d_c0
//   gates [T,B,4H], cells [T,B,H] from forward; c0 [B,H]; w_hh [4H,P]; w_hr [P,H] or nullptr
//   d_gx [T,B,4H] out (inactive rows untouched, pre-zeroed by the caller)
//   d_r [T,B,P], hpre [T,B,H] out and dhbuf [B,H] scratch, only with w_hr
template <typename T>
void backward_loop(const Plan& p, const T* grad_y, T* dh, T* dc, const T* gates, const T* cells, const T* c0,
                   const T* w_hh, const T* w_hr, T* d_gx, T* d_r, T* hpre, T* dhbuf) {
  const int64_t B = p.B, H = p.H, P = p.P, G = 4 * H;
  const SingleThreadedBlas blas_threads;
  for (int64_t s = p.T - 1; s >= 0; --s) {
    const int64_t t = p.order[s], n = p.active[s];
    if (n == 0) continue;
    const T* cprev = s == 0 ? c0 : cells + p.order[s - 1] * B * H;
    const T* gyt = grad_y + t * B * P;
    const T* dh_in = dh;
    const T* gy_in = gyt;
    if (w_hr) {
      // d_r = dh + grad_y reaches y_t = W_hr h_pre; then back through W_hr.
      T* drt = d_r + t * B * P;
      for (int64_t e = 0; e < n * P; ++e) drt[e] = dh[e] + gyt[e];
      gemm_rm<T>(n, H, P, drt, w_hr, /*w_is_mk=*/false, dhbuf);
      dh_in = dhbuf;
      gy_in = nullptr;
    }
    const T* gt = gates + t * B * G;
    const T* ct = cells + t * B * H;
    T* dgt = d_gx + t * B * G;
    T* hpt = hpre ? hpre + t * B * H : nullptr;
    at::parallel_for(0, n, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        backward_row<T>(gt + b * G, ct + b * H, cprev + b * H, dh_in + b * H, gy_in ? gy_in + b * H : nullptr,
                        dc + b * H, dgt + b * G, hpt ? hpt + b * H : nullptr, H);
      }
    });
    gemm_rm<T>(n, P, G, dgt, w_hh, /*w_is_mk=*/false, dh);  // dh_{t-1} = dgates @ W_hh
  }
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lstm_fast cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "lstm_fast cpu: float32 and float64 only, got ", t.scalar_type());
}

}  // namespace

Tensor5 lstm_forward_cpu(const Tensor& gx_, const Tensor& h0_, const Tensor& c0_, const Tensor& w_hh_,
                         const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& batch_sizes,
                         bool reverse, bool need_grad) {
  const Plan p = make_plan(gx_, h0_, c0_, w_hh_, w_hr_, batch_sizes, reverse);
  check_forward_inputs(gx_, h0_);
  check_cpu(gx_, "gx");
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  const Tensor gx = gx_.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  const auto opts = gx.options();
  const int64_t T = p.T, B = p.B, H = p.H, P = p.P, G = 4 * H;
  auto alloc = [&](at::IntArrayRef sizes) { return p.packed ? at::zeros(sizes, opts) : at::empty(sizes, opts); };
  Tensor y = alloc({T, B, P});
  Tensor c = c0_.clone(at::MemoryFormat::Contiguous);
  Tensor gates = need_grad ? alloc({T, B, G}) : at::empty({0}, opts);
  Tensor cells = need_grad ? alloc({T, B, H}) : at::empty({0}, opts);
  Tensor z = need_grad ? Tensor() : at::empty({B, G}, opts);
  Tensor hpre = proj ? at::empty({B, H}, opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "lstm_forward_cpu", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    forward_loop<scalar_t>(p, ptr(gx), ptr(h0), ptr(c), ptr(w_hh), ptr(w_hr), ptr(y),
                           need_grad ? ptr(gates) : nullptr, need_grad ? ptr(cells) : nullptr, ptr(z), ptr(hpre));
  });
  Tensor h_n = final_hidden(y, h0, p);
  return {y, h_n, c, gates, cells};
}

Tensor5 lstm_backward_cpu(const Tensor& grad_y_, const Tensor& grad_hn, const Tensor& grad_cn,
                          const Tensor& gates_, const Tensor& cells_, const Tensor& y_, const Tensor& h0_,
                          const Tensor& c0_, const Tensor& w_hh_, const std::optional<Tensor>& w_hr_,
                          const std::optional<Tensor>& batch_sizes, bool reverse) {
  const Plan p = make_plan(gates_, h0_, c0_, w_hh_, w_hr_, batch_sizes, reverse);
  check_backward_inputs(p, grad_y_, grad_hn, grad_cn, gates_, cells_, y_, h0_);
  check_cpu(h0_, "h0");
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  const Tensor grad_y = grad_y_.contiguous(), gates = gates_.contiguous(), cells = cells_.contiguous();
  const Tensor y = y_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  const auto opts = h0.options();
  const int64_t T = p.T, B = p.B, H = p.H, P = p.P, G = 4 * H;
  auto alloc = [&](at::IntArrayRef sizes) { return p.packed ? at::zeros(sizes, opts) : at::empty(sizes, opts); };
  Tensor d_gx = alloc({T, B, G});
  Tensor dh = grad_hn.clone(at::MemoryFormat::Contiguous);
  Tensor dc = grad_cn.clone(at::MemoryFormat::Contiguous);
  Tensor d_r = proj ? alloc({T, B, P}) : Tensor();
  Tensor hpre = proj ? alloc({T, B, H}) : Tensor();
  Tensor dhbuf = proj ? at::empty({B, H}, opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "lstm_backward_cpu", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    backward_loop<scalar_t>(p, ptr(grad_y), ptr(dh), ptr(dc), ptr(gates), ptr(cells), ptr(c0), ptr(w_hh),
                            ptr(w_hr), ptr(d_gx), ptr(d_r), ptr(hpre), ptr(dhbuf));
  });
  auto [d_w_hh, d_w_hr] = weight_grads(d_gx, y, h0, d_r, hpre, p, w_hh);
  if (!proj) d_w_hr = at::empty({0}, opts);
  return {d_gx, dh, dc, d_w_hh, d_w_hr};
}

}  // namespace lstm_fast

TORCH_LIBRARY_IMPL(lstm_fast, CPU, m) {
  m.impl("lstm_forward", &lstm_fast::lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_fast::lstm_backward_cpu);
}
