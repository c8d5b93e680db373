// One LSTM step (what nn.LSTMCell computes) as single ops, for callers that
// step in their own loop: there the cost of a call, not its arithmetic,
// dominates at small batch, so a step is one dispatcher call into C++ and
// training records one C++ autograd node per step.
//
// Ops (namespace lstm_fast; x [B,I], h and c [B,H], w_ih [4H,I], w_hh [4H,H],
// b_ih and b_hh [4H] or none; gate order i, f, g, o):
//   lstm_cell(x, h, c, w_ih, w_hh, b_ih?, b_hh?) -> (h_n, c_n)
//       differentiable (its Autograd kernel is CellFunction below)
//   lstm_cell_forward(..., need_grad) -> (h_n, c_n, gates)
//       gates: activated i, f, g, o [B,4H] when need_grad, else [0]
//   lstm_cell_backward(grad_h?, grad_c?, gates, c, c_n, x, h, w_ih, w_hh, need[6])
//       -> (d_x, d_h, d_c, d_w_ih, d_w_hh, d_bias); [0] where need is false
//       (need: x, h, c, w_ih, w_hh, bias)
//   lstm_cell_out(x, h, c, w_ih, w_hh, b_ih?, b_hh?, h_out!, c_out!) -> ()
//       the step written into caller-owned tensors (streaming, no allocation)
// CPU only; fake kernels in lstm_fast/_ops.py.

#include "lstm_vec.h"  // first: it picks the vector ISA for ATen

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/lstm_cell.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace lstm_fast {

using at::Tensor;

namespace {

using OptTensor = std::optional<Tensor>;

// Hidden units per block: the pre-activations of a block wait in a per-thread
// buffer ([B, 4, kUnitBlock]) for the cell math.
constexpr int64_t kUnitBlock = 64;
// Rows up to which a step computes its products as dot products over the
// weights' contiguous rows (no packing, which a single step cannot amortise);
// above, two ATen GEMMs. LSTMCell loops, 2 threads, AVX-512, speedup over
// torch.nn.LSTMCell with dots / with GEMMs: B=128 H=256 1.40x / 0.92x, B=512
// H=256 1.13x / 0.91x, B=2048 H=256 (dots in 1024-row chunks) 0.86x / 0.95x
// (bench/NOTES_latency.md#dot-rows).
constexpr int64_t kDotMaxRows = 512;
// Multiply-adds below which a step runs on one thread. A fork/join waits for a
// preempted partner thread: on the shared 2-core machine (load 5) a split B=1
// H=256 step (524288) took 7.8 ms, against 34 us on one thread
// (bench/NOTES_latency.md#threads); only steps of ~150 us and more split.
constexpr int64_t kSplitMinWork = int64_t(1) << 22;

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

void check_step(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih, const Tensor& w_hh,
                const OptTensor& b_ih, const OptTensor& b_hh) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && c.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2,
              "lstm_fast.lstm_cell: x, h, c and the weights must be 2-D");
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  TORCH_CHECK(h.size(0) == B && c.size(0) == B && c.size(1) == H && w_ih.size(0) == 4 * H && w_ih.size(1) == I &&
                  w_hh.size(0) == 4 * H && w_hh.size(1) == H,
              "lstm_fast.lstm_cell: inconsistent shapes: x ", x.sizes(), ", h ", h.sizes(), ", c ", c.sizes(),
              ", w_ih ", w_ih.sizes(), ", w_hh ", w_hh.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "lstm_fast.lstm_cell: float32 or float64, got ", dtype);
  for (const Tensor* t : {&h, &c, &w_ih, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device() == x.device(),
                "lstm_fast.lstm_cell: every tensor must have x's dtype and device");
  }
  for (const OptTensor* b : {&b_ih, &b_hh}) {
    if (defined(*b)) {
      TORCH_CHECK(
          (*b)->dim() == 1 && (*b)->size(0) == 4 * H && (*b)->scalar_type() == dtype && (*b)->device() == x.device(),
          "lstm_fast.lstm_cell: biases must be [4H] with x's dtype and device");
    }
  }
}

// The sum of a vector's lanes.
template <typename T>
inline T hsum(const Vectorized<T>& a) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& p, const Vectorized<T>& q) { return p + q; }, a);
}

// Dot products of one vector v [K] with the rows j, j+H, j+2H, j+3H of a
// weight (w points at row j; gate rows gs elements apart): out[q] += w_q . v.
template <typename T>
inline void dot4(const T* w, int64_t gs, const T* v, int64_t K, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0)), b0(T(0)), b1(T(0)), b2(T(0)), b3(T(0));
  int64_t k = 0;
  // two chains per gate: eight independent FMAs hide the FMA latency
  for (; k + 2 * L <= K; k += 2 * L) {
    const V v0 = V::loadu(v + k), v1 = V::loadu(v + k + L);
    a0 = at::vec::fmadd(V::loadu(w + k), v0, a0);
    a1 = at::vec::fmadd(V::loadu(w + gs + k), v0, a1);
    a2 = at::vec::fmadd(V::loadu(w + 2 * gs + k), v0, a2);
    a3 = at::vec::fmadd(V::loadu(w + 3 * gs + k), v0, a3);
    b0 = at::vec::fmadd(V::loadu(w + k + L), v1, b0);
    b1 = at::vec::fmadd(V::loadu(w + gs + k + L), v1, b1);
    b2 = at::vec::fmadd(V::loadu(w + 2 * gs + k + L), v1, b2);
    b3 = at::vec::fmadd(V::loadu(w + 3 * gs + k + L), v1, b3);
  }
  for (; k < K; k += L) {  // the tail by count: loadu fills the rest with zeros
    const int64_t n = std::min<int64_t>(L, K - k);
    const V v0 = V::loadu(v + k, n);
    a0 = at::vec::fmadd(V::loadu(w + k, n), v0, a0);
    a1 = at::vec::fmadd(V::loadu(w + gs + k, n), v0, a1);
    a2 = at::vec::fmadd(V::loadu(w + 2 * gs + k, n), v0, a2);
    a3 = at::vec::fmadd(V::loadu(w + 3 * gs + k, n), v0, a3);
  }
  out[0] += hsum(a0 + b0);
  out[1] += hsum(a1 + b1);
  out[2] += hsum(a2 + b2);
  out[3] += hsum(a3 + b3);
}

// Raw pointers of one step. z: the pre-activations [B,4H] from the GEMM path,
// or nullptr (the dot products run here). gates: [B,4H] or nullptr.
template <typename T>
struct StepData {
  const T *x, *h, *c, *w_ih, *w_hh, *b_ih, *b_hh, *z;
  T *h_out, *c_out, *gates;
  int64_t B, I, H;
};

// acc[r][q] += (gate row q of one unit) . x_r over K, in vector lanes: R rows
// share each weight vector loaded (4 + R loads per 4R FMAs). w points at the
// unit's gate-0 row, gate rows gs apart; a K tail is read by count.
template <typename T, int R>
inline void dot_rows(const T* w, int64_t gs, const T* const* x, int64_t K, Vectorized<T> (&acc)[R][4]) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  for (int64_t k = 0; k < K; k += L) {
    const int64_t n = std::min<int64_t>(L, K - k);
    V wq[4];
    for (int q = 0; q < 4; ++q) wq[q] = n == L ? V::loadu(w + q * gs + k) : V::loadu(w + q * gs + k, n);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const V xv = n == L ? V::loadu(x[r] + k) : V::loadu(x[r] + k, n);
      for (int q = 0; q < 4; ++q) acc[r][q] = at::vec::fmadd(wq[q], xv, acc[r][q]);
    }
  }
}

// Pre-activations of unit j for rows b .. b+R-1: bias[q] + w_ih_q . x + w_hh_q . h,
// handed to put(row, acc[4]).
template <typename T, int R, typename Put>
inline void unit_rows(const StepData<T>& d, int64_t j, int64_t b, const T* bias, Put&& put) {
  using V = Vectorized<T>;
  V acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = V(T(0));
  const T* xs[R];
  const T* hs[R];
  for (int r = 0; r < R; ++r) {
    xs[r] = d.x + (b + r) * d.I;
    hs[r] = d.h + (b + r) * d.H;
  }
  dot_rows<T, R>(d.w_ih + j * d.I, d.H * d.I, xs, d.I, acc);
  dot_rows<T, R>(d.w_hh + j * d.H, d.H * d.H, hs, d.H, acc);
  // all sums first, then the stores: put() between the sums kept acc in memory and
  // ran the B=32 H=512 LSTMCell loop at 87 ms instead of 37
  T out[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) out[r][q] = bias[q] + hsum(acc[r][q]);
  for (int r = 0; r < R; ++r) put(b + r, out[r]);
}

// Rows per unit_rows call (4R accumulators). Chosen on the 2-core EPYC (Zen 4),
// LSTMCell loop B=32 H=512, 2 threads, ms per 50 steps: AVX-512 R=2 52.9, R=4
// 36.5-39.0, R=5 76.8, R=6 79.7 (spills); AVX2 R=2 59.9-65.5, R=3 46.4-49.2,
// R=4 62.4 (bench/NOTES_latency.md#dot-rows).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kDotRows = 4;
#else
constexpr int kDotRows = 3;
#endif

// Units [j0, j1) of rows 0 .. d.B-1 (at most kDotMaxRows): pre-activations,
// then the cell math in vectors. Unit by unit, its four gate rows of the
// weights (4*(I+H) elements) are read from memory once and from L1 for the
// other rows of the batch.
template <typename T>
void step_rows(const StepData<T>& d, int64_t j0, int64_t j1) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t H = d.H, G = 4 * H, B = d.B;
  // gate q of unit u0+u in row b at z[(b*4 + q)*kUnitBlock + u]; kept per
  // thread (up to 1 MiB of double: too large for a worker thread's stack)
  thread_local std::vector<T> zbuf;
  if (zbuf.size() < size_t(B * 4 * kUnitBlock)) zbuf.resize(B * 4 * kUnitBlock);
  T* z = zbuf.data();
  for (int64_t u0 = j0; u0 < j1; u0 += kUnitBlock) {
    const int64_t nu = std::min(kUnitBlock, j1 - u0);
    for (int64_t u = 0; u < nu; ++u) {
      const int64_t j = u0 + u;
      T bias[4];
      for (int q = 0; q < 4; ++q) bias[q] = (d.b_ih ? d.b_ih[q * H + j] : T(0)) + (d.b_hh ? d.b_hh[q * H + j] : T(0));
      const auto put = [&](int64_t b, const T* acc) {
        for (int q = 0; q < 4; ++q) z[(b * 4 + q) * kUnitBlock + u] = acc[q];
      };
      int64_t b = 0;
      if (d.z) {
        for (; b < B; ++b) {
          T acc[4];
          for (int q = 0; q < 4; ++q) acc[q] = bias[q] + d.z[b * G + q * H + j];
          put(b, acc);
        }
      }
      for (; b + kDotRows <= B; b += kDotRows) unit_rows<T, kDotRows>(d, j, b, bias, put);
      for (; b + 2 <= B; b += 2) unit_rows<T, 2>(d, j, b, bias, put);
      if (b < B) {  // one row: two FMA chains per gate (dot4)
        T acc[4];
        for (int q = 0; q < 4; ++q) acc[q] = bias[q];
        dot4(d.w_ih + j * d.I, H * d.I, d.x + b * d.I, d.I, acc);
        dot4(d.w_hh + j * H, H * H, d.h + b * H, H, acc);
        put(b, acc);
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const T* zb = &z[b * 4 * kUnitBlock];
      for (int64_t u = 0; u < nu; u += L) {
        const int64_t n = std::min<int64_t>(L, nu - u);
        const int64_t r = b * H + u0 + u;
        const CellForward<V> a =
            cell_forward(V::loadu(zb + u, n), V::loadu(zb + kUnitBlock + u, n), V::loadu(zb + 2 * kUnitBlock + u, n),
                         V::loadu(zb + 3 * kUnitBlock + u, n), V::loadu(d.c + r, n));
        a.h.store(d.h_out + r, n);
        a.c.store(d.c_out + r, n);
        if (d.gates) {
          T* g = d.gates + b * G + u0 + u;
          a.i.store(g, n);
          a.f.store(g + H, n);
          a.g.store(g + 2 * H, n);
          a.o.store(g + 3 * H, n);
        }
      }
    }
  }
}

// Units [j0, j1) of every row, kDotMaxRows rows at a time.
template <typename T>
void step_units(const StepData<T>& d, int64_t j0, int64_t j1) {
  const int64_t H = d.H, G = 4 * H;
  for (int64_t r0 = 0; r0 < d.B; r0 += kDotMaxRows) {
    StepData<T> part = d;
    part.B = std::min(kDotMaxRows, d.B - r0);
    part.x += r0 * d.I;
    part.h += r0 * H;
    part.c += r0 * H;
    part.h_out += r0 * H;
    part.c_out += r0 * H;
    if (part.z) part.z += r0 * G;
    if (part.gates) part.gates += r0 * G;
    step_rows(part, j0, j1);
  }
}

// h_out, c_out [B,H] (and gates [B,4H] when defined) from one step. Inputs
// checked and contiguous; the outputs may not overlap them.
void step_cpu(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih, const Tensor& w_hh,
              const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& h_out, const Tensor& c_out,
              const Tensor& gates) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  Tensor z;
  if (B > kDotMaxRows) {
    // GEMM-shaped: ATen's (MKL) products, then the cell math reads them
    z = at::mm(x, w_ih.t());
    z.addmm_(h, w_hh.t());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_fast.lstm_cell", [&] {
    StepData<scalar_t> d{x.const_data_ptr<scalar_t>(),
                         h.const_data_ptr<scalar_t>(),
                         c.const_data_ptr<scalar_t>(),
                         w_ih.const_data_ptr<scalar_t>(),
                         w_hh.const_data_ptr<scalar_t>(),
                         defined(b_ih) ? b_ih->const_data_ptr<scalar_t>() : nullptr,
                         defined(b_hh) ? b_hh->const_data_ptr<scalar_t>() : nullptr,
                         z.defined() ? z.const_data_ptr<scalar_t>() : nullptr,
                         h_out.mutable_data_ptr<scalar_t>(),
                         c_out.mutable_data_ptr<scalar_t>(),
                         gates.defined() ? gates.mutable_data_ptr<scalar_t>() : nullptr,
                         B,
                         I,
                         H};
    const int64_t work = z.defined() ? B * 4 * H : B * 4 * H * (I + H);
    const int64_t blocks = (H + kUnitBlock - 1) / kUnitBlock;
    const int64_t per_block = std::max<int64_t>(1, work / blocks);
    at::parallel_for(0, blocks, std::max<int64_t>(1, kSplitMinWork / per_block),
                     [&](int64_t k0, int64_t k1) { step_units(d, k0 * kUnitBlock, std::min(H, k1 * kUnitBlock)); });
  });
}

Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }
OptTensor contig(const OptTensor& t) { return defined(t) ? OptTensor(contig(*t)) : std::nullopt; }

std::tuple<Tensor, Tensor, Tensor> cell_forward_cpu(const Tensor& x_, const Tensor& h_, const Tensor& c_,
                                                    const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& b_ih,
                                                    const OptTensor& b_hh, bool need_grad) {
  check_step(x_, h_, c_, w_ih_, w_hh_, b_ih, b_hh);
  const Tensor x = contig(x_), h = contig(h_), c = contig(c_), w_ih = contig(w_ih_), w_hh = contig(w_hh_);
  const Tensor h_out = at::empty(h.sizes(), h.options()), c_out = at::empty(c.sizes(), c.options());
  const Tensor gates = need_grad ? at::empty({x.size(0), 4 * h.size(1)}, h.options()) : at::empty({0}, h.options());
  step_cpu(x, h, c, w_ih, w_hh, contig(b_ih), contig(b_hh), h_out, c_out, need_grad ? gates : Tensor());
  return {h_out, c_out, gates};
}

std::tuple<Tensor, Tensor> cell_cpu(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih,
                                    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  auto [h_out, c_out, gates] = cell_forward_cpu(x, h, c, w_ih, w_hh, b_ih, b_hh, false);
  return {h_out, c_out};
}

void cell_out_cpu(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih, const Tensor& w_hh,
                  const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& h_out, const Tensor& c_out) {
  check_step(x, h, c, w_ih, w_hh, b_ih, b_hh);
  TORCH_CHECK(h_out.sizes() == h.sizes() && c_out.sizes() == c.sizes() && h_out.is_contiguous() &&
                  c_out.is_contiguous() && h_out.scalar_type() == h.scalar_type() &&
                  c_out.scalar_type() == c.scalar_type() && h_out.device() == h.device() &&
                  c_out.device() == c.device(),
              "lstm_fast.lstm_cell_out: h_out and c_out must be contiguous, with h's and c's shape, dtype and device");
  // the products read all of h and the update all of c while writing: no overlap allowed
  for (const Tensor* out : {&h_out, &c_out}) {
    for (const Tensor* in : {&x, &h, &c}) {
      TORCH_CHECK(at::get_overlap_status(*out, *in) == at::MemOverlapStatus::No,
                  "lstm_fast.lstm_cell_out: h_out and c_out may not share memory with x, h, c");
    }
  }
  TORCH_CHECK(at::get_overlap_status(h_out, c_out) == at::MemOverlapStatus::No,
              "lstm_fast.lstm_cell_out: h_out and c_out may not share memory");
  step_cpu(contig(x), contig(h), contig(c), contig(w_ih), contig(w_hh), contig(b_ih), contig(b_hh), h_out, c_out,
           Tensor());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cell_backward_cpu(
    const OptTensor& grad_h, const OptTensor& grad_c, const Tensor& gates_, const Tensor& c_, const Tensor& c_n_,
    const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh, std::array<bool, 6> need) {
  const int64_t B = c_.size(0), H = c_.size(1);
  TORCH_CHECK(gates_.dim() == 2 && gates_.size(0) == B && gates_.size(1) == 4 * H && c_n_.sizes() == c_.sizes(),
              "lstm_fast.lstm_cell_backward: gates must be [B, 4H] and c_n [B, H]");
  const Tensor gates = contig(gates_), c = contig(c_), c_n = contig(c_n_);
  const Tensor gh = defined(grad_h) ? contig(*grad_h) : Tensor(), gc = defined(grad_c) ? contig(*grad_c) : Tensor();
  const Tensor d_gates = at::empty({B, 4 * H}, gates.options());
  const Tensor d_c = at::empty({B, H}, c.options());
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_fast.lstm_cell_backward", [&] {
    using V = Vectorized<scalar_t>;
    constexpr int64_t L = V::size();
    const scalar_t* g = gates.const_data_ptr<scalar_t>();
    const scalar_t *cp = c.const_data_ptr<scalar_t>(), *cn = c_n.const_data_ptr<scalar_t>();
    const scalar_t* dh = gh.defined() ? gh.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* dcn = gc.defined() ? gc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t *dg = d_gates.mutable_data_ptr<scalar_t>(), *dc = d_c.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < H; j += L) {
        const int64_t n = std::min<int64_t>(L, H - j), r = b * H + j, s = b * 4 * H + j;
        const CellBackward<V> d =
            cell_backward(V::loadu(g + s, n), V::loadu(g + s + H, n), V::loadu(g + s + 2 * H, n),
                          V::loadu(g + s + 3 * H, n), V::loadu(cn + r, n), V::loadu(cp + r, n),
                          dh ? V::loadu(dh + r, n) : V(scalar_t(0)), dcn ? V::loadu(dcn + r, n) : V(scalar_t(0)));
        d.di.store(dg + s, n);
        d.df.store(dg + s + H, n);
        d.dg.store(dg + s + 2 * H, n);
        d.do_.store(dg + s + 3 * H, n);
        d.dc_prev.store(dc + r, n);
      }
    }
  });
  const Tensor none = at::empty({0}, gates.options());
  const Tensor d_gates_t = d_gates.t();
  return {need[0] ? d_gates.mm(w_ih) : none, need[1] ? d_gates.mm(w_hh) : none, need[2] ? d_c : none,
          need[3] ? d_gates_t.mm(x) : none,  need[4] ? d_gates_t.mm(h) : none,  need[5] ? d_gates.sum(0) : none};
}

// The autograd node of lstm_cell: one per step. Plain backward runs the fused
// kernel above; a backward that must itself be differentiable
// (create_graph=True) recomputes the step with ATen's differentiable ops.
struct CellFunction : public torch::autograd::Function<CellFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& h,
                                                const Tensor& c, const Tensor& w_ih, const Tensor& w_hh,
                                                const OptTensor& b_ih, const OptTensor& b_hh) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("lstm_fast::lstm_cell_forward", "")
            .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const OptTensor&, const OptTensor&, bool)>();
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined, not zeros
    at::AutoDispatchBelowADInplaceOrView below;
    auto [h_n, c_n, gates] = op.call(x, h, c, w_ih, w_hh, b_ih, b_hh, true);
    ctx->save_for_backward({x, h, c, w_ih, w_hh, b_ih.value_or(Tensor()), b_hh.value_or(Tensor()), gates, c_n});
    ctx->saved_data["bias_ih"] = defined(b_ih);
    ctx->saved_data["bias_hh"] = defined(b_hh);
    return {h_n, c_n};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &h = saved[1], &c = saved[2], &w_ih = saved[3], &w_hh = saved[4];
    const Tensor b_ih = ctx->saved_data["bias_ih"].toBool() ? saved[5] : Tensor();
    const Tensor b_hh = ctx->saved_data["bias_hh"].toBool() ? saved[6] : Tensor();
    const bool need_b = (b_ih.defined() && ctx->needs_input_grad(5)) || (b_hh.defined() && ctx->needs_input_grad(6));
    if (at::GradMode::is_enabled()) {
      return differentiable_backward(ctx, {x, h, c, w_ih, w_hh, b_ih, b_hh}, grads);
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lstm_fast::lstm_cell_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                             const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::array<bool, 6>)>();
    const std::array<bool, 6> need{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   ctx->needs_input_grad(3), ctx->needs_input_grad(4), need_b};
    auto [d_x, d_h, d_c, d_w_ih, d_w_hh, d_b] =
        op.call(grads[0], grads[1], saved[7], c, saved[8], x, h, w_ih, w_hh, need);
    const auto keep = [&](const Tensor& g, int i) { return ctx->needs_input_grad(i) ? g : Tensor(); };
    // two biases get two tensors: a parameter's .grad may take its gradient over
    const Tensor d_b_ih = b_ih.defined() ? keep(d_b, 5) : Tensor();
    Tensor d_b_hh = b_hh.defined() ? keep(d_b, 6) : Tensor();
    if (d_b_ih.defined() && d_b_hh.defined()) d_b_hh = d_b_hh.clone();
    return {keep(d_x, 0), keep(d_h, 1), keep(d_c, 2), keep(d_w_ih, 3), keep(d_w_hh, 4), d_b_ih, d_b_hh};
  }

  // The step again as ATen ops, differentiated with create_graph. Each input
  // enters through a view of its own, so a gradient taken at it counts only
  // the paths through this step (not through another input derived from it).
  static torch::autograd::variable_list differentiable_backward(torch::autograd::AutogradContext* ctx,
                                                                const std::array<Tensor, 7>& inputs,
                                                                const torch::autograd::variable_list& grads) {
    std::array<Tensor, 7> leaves;
    std::vector<Tensor> asked;
    std::vector<int> where;
    for (int i = 0; i < 7; ++i) {
      const Tensor& t = inputs[i];
      if (!t.defined()) continue;
      leaves[i] = t.requires_grad() ? t.view_as(t) : t.detach().requires_grad_(ctx->needs_input_grad(i));
      if (ctx->needs_input_grad(i)) {
        asked.push_back(leaves[i]);
        where.push_back(i);
      }
    }
    torch::autograd::variable_list result(7);
    std::vector<Tensor> outs, cots;
    const auto hc = at::lstm_cell(leaves[0], {leaves[1], leaves[2]}, leaves[3], leaves[4], leaves[5], leaves[6]);
    for (int k = 0; k < 2; ++k) {
      if (grads[k].defined()) {
        outs.push_back(k == 0 ? std::get<0>(hc) : std::get<1>(hc));
        cots.push_back(grads[k]);
      }
    }
    if (asked.empty() || outs.empty()) return result;
    const auto got = torch::autograd::grad(outs, asked, cots, /*retain_graph=*/true, /*create_graph=*/true,
                                           /*allow_unused=*/true);
    for (size_t k = 0; k < where.size(); ++k) result[where[k]] = got[k];
    return result;
  }
};

std::tuple<Tensor, Tensor> cell_autograd(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih,
                                         const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  const bool any_grad =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || h.requires_grad() || c.requires_grad() || w_ih.requires_grad() || w_hh.requires_grad() ||
       (defined(b_ih) && b_ih->requires_grad()) || (defined(b_hh) && b_hh->requires_grad()));
  if (!any_grad) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lstm_fast::lstm_cell", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const OptTensor&, const OptTensor&)>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, h, c, w_ih, w_hh, b_ih, b_hh);
  }
  const auto out = CellFunction::apply(x, h, c, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace lstm_fast

TORCH_LIBRARY_FRAGMENT(lstm_fast, m) {
  m.def(
      "lstm_cell(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> "
      "(Tensor h_n, Tensor c_n)");
  m.def(
      "lstm_cell_forward(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool need_grad) -> (Tensor h_n, Tensor c_n, Tensor gates)");
  m.def(
      "lstm_cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor gates, Tensor c, Tensor c_n, Tensor x, Tensor h, "
      "Tensor w_ih, Tensor w_hh, bool[6] need) -> "
      "(Tensor d_x, Tensor d_h, Tensor d_c, Tensor d_w_ih, Tensor d_w_hh, Tensor d_bias)");
  m.def(
      "lstm_cell_out(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor(a!) h_out, Tensor(b!) c_out) -> ()");
}

TORCH_LIBRARY_IMPL(lstm_fast, CPU, m) {
  m.impl("lstm_cell", &lstm_fast::cell_cpu);
  m.impl("lstm_cell_forward", &lstm_fast::cell_forward_cpu);
  m.impl("lstm_cell_backward", &lstm_fast::cell_backward_cpu);
  m.impl("lstm_cell_out", &lstm_fast::cell_out_cpu);
}

TORCH_LIBRARY_IMPL(lstm_fast, Autograd, m) { m.impl("lstm_cell", &lstm_fast::cell_autograd); }
