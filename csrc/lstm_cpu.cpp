// CPU implementation: the whole time loop in C++, inside one OpenMP parallel
// region. Each thread owns a range of batch rows (from 4 rows a thread, W_hh up
// to 1 MiB) or else of hidden units: per step it computes all four gates of its
// part (a product with its slab of W_hh, packed once per call) and their
// activations and state update; split by units, one barrier per step publishes
// h_t. Backward mirrors it; the weight gradients are GEMMs over all T afterwards.

#include "lstm_vec.h"  // first: it picks the vector ISA for ATen

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <omp.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "lstm.h"

namespace lstm_fast {

namespace {

// One row's hidden units [j0, j0+nj) of the forward step, in vector chunks
// (tail by count). Each gate block q of a row sits at q*zs in z, q*xs in gx
// and q*gs in gates (the gate strides of those buffers).
//   z     in: h_{t-1} @ W_hh^T for these units, [4 blocks of nj] at stride zs
//   gx    input projection at this row and step, offset to j0 (stride xs: H, or
//         nj for a thread's own projected columns)
//   c     [nj] in: c_{t-1}, out: c_t (in place)
//   h     [nj] out: o * tanh(c~_t) (y row, or the pre-projection buffer)
//   cell  [nj] out: copy of c_t, or nullptr
//   gates out: activations i,f,g,o at stride gs, or nullptr
//   zc    [nj] cell zoneout weights of c_{t-1}, or nullptr: c_t = c~_t + zc (c_{t-1} - c~_t)
// All distinct buffers.
template <typename T>
void forward_row(const T* z, int64_t zs, const T* gx, int64_t xs, T* c, T* h, T* cell, T* gates, int64_t gs, int64_t nj,
                 const T* zc = nullptr) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  for (int64_t j = 0; j < nj; j += L) {
    const int64_t cnt = std::min<int64_t>(L, nj - j);
    const CellForward<V> a = cell_forward(
        V::loadu(z + j, cnt) + V::loadu(gx + j, cnt), V::loadu(z + zs + j, cnt) + V::loadu(gx + xs + j, cnt),
        V::loadu(z + 2 * zs + j, cnt) + V::loadu(gx + 2 * xs + j, cnt),
        V::loadu(z + 3 * zs + j, cnt) + V::loadu(gx + 3 * xs + j, cnt), V::loadu(c + j, cnt));
    const V c_t = zc ? at::vec::fmadd(V::loadu(zc + j, cnt), V::loadu(c + j, cnt) - a.c, a.c) : a.c;
    c_t.store(c + j, cnt);
    a.h.store(h + j, cnt);
    if (cell) c_t.store(cell + j, cnt);
    if (gates) {
      a.i.store(gates + j, cnt);
      a.f.store(gates + gs + j, cnt);
      a.g.store(gates + 2 * gs + j, cnt);
      a.o.store(gates + 3 * gs + j, cnt);
    }
  }
}

// One row's hidden units [j0, j0+nj) of the backward step; every pointer is
// offset to j0, gate blocks at stride gs (= H).
//   gates activations i,f,g,o of this step;  cell [nj] c_t;  cprev [nj] c_{t-1}
//   dh    [nj] gradient reaching h_t (before the projection); gy [nj] added to
//              it when not null (no projection: dh is the carried state)
//   dc    [nj] in: gradient reaching c_t from later steps; out: to c_{t-1}
//   dg    out: gradient of the gate pre-activations (= d_gx row), stride gs
//   hpre  [nj] out: o * tanh(c~_t) for d_w_hr, or nullptr
//   zc    [nj] cell zoneout weights (forward_row), or nullptr: cell then holds
//         c_t, and c~_t = f c_{t-1} + i g is recomputed
//   zh, carry  [nj] hidden zoneout weights and out: zh * (gradient reaching h_t),
//         the part that reaches h_{t-1} directly; both nullptr without
template <typename T>
void backward_row(const T* gates, int64_t gs, const T* cell, const T* cprev, const T* dh, const T* gy, T* dc, T* dg,
                  T* hpre, int64_t nj, const T* zc = nullptr, const T* zh = nullptr, T* carry = nullptr) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  for (int64_t j = 0; j < nj; j += L) {
    const int64_t cnt = std::min<int64_t>(L, nj - j);
    V d_h = V::loadu(dh + j, cnt);
    if (gy) d_h = d_h + V::loadu(gy + j, cnt);
    if (zh) {
      const V kept = V::loadu(zh + j, cnt) * d_h;
      kept.store(carry + j, cnt);
      d_h = d_h - kept;
    }
    const V i = V::loadu(gates + j, cnt), f = V::loadu(gates + gs + j, cnt), g = V::loadu(gates + 2 * gs + j, cnt);
    const V cp = V::loadu(cprev + j, cnt), dc_t = V::loadu(dc + j, cnt);
    V c = V::loadu(cell + j, cnt), dc_in = dc_t, dc_kept(T(0));
    if (zc) {
      c = at::vec::fmadd(f, cp, i * g);  // as cell_forward computed c~_t
      dc_kept = V::loadu(zc + j, cnt) * dc_t;
      dc_in = dc_t - dc_kept;
    }
    const CellBackward<V> d = cell_backward(i, f, g, V::loadu(gates + 3 * gs + j, cnt), c, cp, d_h, dc_in);
    d.di.store(dg + j, cnt);
    d.df.store(dg + gs + j, cnt);
    d.dg.store(dg + 2 * gs + j, cnt);
    d.do_.store(dg + 3 * gs + j, cnt);
    (zc ? d.dc_prev + dc_kept : d.dc_prev).store(dc + j, cnt);
    if (hpre) d.h_pre.store(hpre + j, cnt);
  }
}

// ---------------------------------------------------------------------------
// Per-step products with a packed weight slab and a register-blocked kernel.
//
// Each thread owns a slab of M output columns of a product c[n, M] = a[n, K] @ S
// and keeps S packed once per call in panels of PW = 2 vectors of columns:
// panel p is [K][PW] contiguous (columns past M zero). The kernel holds an
// MR x (NP panels) block of c in registers and streams K: per k one broadcast
// of a[r, k] per row and 2*NP vector loads of S. Faster than a BLAS call per
// step at these shapes: bench/NOTES_cpp.md#per-step-product.

template <typename T>
struct Slab {
  T* data = nullptr;  // [np][K][PW]
  int64_t K = 0, M = 0, np = 0;
  std::unique_ptr<T[]> owned;
};

// Slabs up to this many bytes reuse a buffer kept by the (long-lived) OpenMP pool
// thread, as a fresh one page-faults on every call; at most three per thread.
// 64 MiB ran short calls with large weights 2.7-4.7x faster than 1 MiB (bench/NOTES_cpp.md#slab-cache).
constexpr size_t kSlabCacheBytes = size_t(1) << 26;

template <typename T>
T* slab_buffer(Slab<T>& s, size_t n, int which) {
  if (n * sizeof(T) > kSlabCacheBytes) {
    s.owned.reset(new T[n]);
    return s.owned.get();
  }
  thread_local std::vector<T> cache[3];
  if (cache[which].size() < n) cache[which].resize(n);
  return cache[which].data();
}

template <typename T>
constexpr int64_t panel_width() {
  return 2 * Vectorized<T>::size();
}

// Packs S[k, m] = col(m)[k * sk] for k < K, m < M into panels (see above);
// col(m) points at column m's first element. Loops follow the source's
// contiguous direction: the packing is a per-call cost, visible at small T*B.
// which (0, 1 or 2) names the thread's cached buffer: up to three slabs live at once.
template <typename T, typename F>
void pack_slab(Slab<T>& s, int which, int64_t K, int64_t M, int64_t sk, F col) {
  constexpr int64_t PW = panel_width<T>();
  s.K = K;
  s.M = M;
  s.np = (M + PW - 1) / PW;
  s.data = slab_buffer(s, s.np * K * PW, which);  // every element is written below
  for (int64_t pn = 0; pn < s.np; ++pn) {
    T* dst = s.data + pn * K * PW;
    const int64_t c1 = std::min(PW, M - pn * PW);
    if (sk == 1) {
      for (int64_t c = 0; c < c1; ++c) {
        const T* src = col(pn * PW + c);
        for (int64_t k = 0; k < K; ++k) dst[k * PW + c] = src[k];
      }
    } else {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < c1; ++c) dst[k * PW + c] = col(pn * PW + c)[k * sk];
    }
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = c1; c < PW; ++c) dst[k * PW + c] = T(0);
  }
}

// c[MR rows, columns of NP panels from panel p0] = a[MR, K] @ S; columns at or
// past S.M are not stored. a [MR rows at stride lda, K]; c [MR rows at stride
// ldc]; c does not alias a or S.
template <typename T, int MR, int NP>
inline void micro_kernel(const T* a, int64_t lda, const Slab<T>& s, int64_t p0, T* c, int64_t ldc) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size(), PW = panel_width<T>();
  const int64_t K = s.K;
  const T* w = s.data + p0 * K * PW;
  V acc[MR][2 * NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v) acc[r][v] = V(T(0));
  for (int64_t k = 0; k < K; ++k) {
    V wv[2 * NP];
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      wv[2 * p] = V::loadu(w + p * K * PW + k * PW);
      wv[2 * p + 1] = V::loadu(w + p * K * PW + k * PW + L);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V ar(a[r * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < 2 * NP; ++v) acc[r][v] = at::vec::fmadd(ar, wv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < 2 * NP; ++v) {
    const int64_t col = p0 * PW + v * L;
    const int64_t cnt = std::min<int64_t>(L, s.M - col);
    if (cnt <= 0) break;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      if (cnt == L) {
        acc[r][v].store(c + r * ldc + col);
      } else {
        acc[r][v].store(c + r * ldc + col, cnt);
      }
    }
  }
}

// MR rows over all panels: NP panels at a time (at most 14 accumulators, within
// AVX2's 16 vector registers), leftovers one panel at a time.
template <typename T, int MR>
void rows_block(const T* a, int64_t lda, const Slab<T>& s, T* c, int64_t ldc) {
  constexpr int NP = MR == 1 ? 4 : MR == 2 ? 3 : MR == 3 ? 2 : 1;
  int64_t p = 0;
  for (; p + NP <= s.np; p += NP) micro_kernel<T, MR, NP>(a, lda, s, p, c, ldc);
  for (; p < s.np; ++p) micro_kernel<T, MR, 1>(a, lda, s, p, c, ldc);
}

// Rows per register block of slab_gemm: 6 x 2 vectors (12 accumulators) in
// AVX2's 16 registers, 8 x 2 in AVX-512's 32. 8 rows ran training at T=100 B=32
// H=256 in 60.8-61.9 ms against 64.7-66.4 with 6, inference at B=8 H=128 in
// 1.16-1.19 against 1.27-1.31 ms (bench/NOTES_cpp.md#per-step-product).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kBlockRows = 8;
#else
constexpr int kBlockRows = 6;
#endif

// c[n, S.M] = a[n, K] @ S. a: n rows at stride lda; c: n rows at stride ldc,
// not aliasing a. kBlockRows-row blocks, panel-outer so one panel stays in L1
// across the blocks; then the leftover rows.
template <typename T>
void slab_gemm(int64_t n, const T* a, int64_t lda, const Slab<T>& s, T* c, int64_t ldc) {
  if (s.M == 0 || n == 0) return;
  constexpr int MR = kBlockRows;
  const int64_t nb = n / MR * MR;
  if (nb > 0) {
    for (int64_t p = 0; p < s.np; ++p)
      for (int64_t r = 0; r < nb; r += MR) micro_kernel<T, MR, 1>(a + r * lda, lda, s, p, c + r * ldc, ldc);
  }
  const T* ar = a + nb * lda;
  T* cr = c + nb * ldc;
  switch (n - nb) {
    case 1: rows_block<T, 1>(ar, lda, s, cr, ldc); break;
    case 2: rows_block<T, 2>(ar, lda, s, cr, ldc); break;
    case 3: rows_block<T, 3>(ar, lda, s, cr, ldc); break;
    case 4: rows_block<T, 4>(ar, lda, s, cr, ldc); break;
    case 5: rows_block<T, 5>(ar, lda, s, cr, ldc); break;
    case 6:
      if constexpr (MR > 6) rows_block<T, 6>(ar, lda, s, cr, ldc);
      break;
    case 7:
      if constexpr (MR > 7) rows_block<T, 7>(ar, lda, s, cr, ldc);
      break;
    default: break;
  }
}

// ---------------------------------------------------------------------------
// The barrier between the steps of a split time loop. A waiter spins briefly,
// then sleeps on a futex until the last thread arrives. OpenMP's barrier spins
// far longer (libgomp: 300000 spins, ~7 ms): when the OS preempts one thread of
// the loop, the others burn their time slices spinning, and a training step ran
// 30-60x slower with two other processes busy on the cores
// (bench/NOTES_cpp.md#preempted-threads).

// Spins (with a pause hint) before a waiter sleeps: 2000 took ~50 us on the
// 2-core EPYC (bench/NOTES_numba.md#spin-wait), more than a step's imbalance
// between threads where splitting pays and far less than an OS time slice.
constexpr int kBarrierSpins = 2000;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class StepBarrier {
 public:
  // Blocks until n threads (the whole team) have called it for this round.
  void arrive_and_wait(int n) {
    if (n <= 1) return;
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count_.store(0, std::memory_order_relaxed);  // nobody touches count_ before gen_ moves
      gen_.fetch_add(1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake();
      return;
    }
    for (int i = 0; i < kBarrierSpins; ++i) {
      if (gen_.load(std::memory_order_acquire) != gen) return;
      spin_pause();
    }
    // seq_cst on both sides: either the last thread sees sleepers_ > 0 and wakes
    // us, or our futex wait sees gen_ moved and returns at once.
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (gen_.load(std::memory_order_seq_cst) == gen) sleep(gen);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
#if defined(__linux__)
  void sleep(uint32_t gen) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, gen, nullptr, nullptr, 0);
  }
  void wake() {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
  }
#else
  void sleep(uint32_t) { std::this_thread::yield(); }
  void wake() {}
#endif
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<uint32_t> gen_{0};
  std::atomic<int> sleepers_{0};
};
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");

// [lo, hi) of 0..N for part k of nt, in whole vectors where possible so the
// pointwise passes run without tails; parts differ by at most one vector.
template <typename T>
std::pair<int64_t, int64_t> split_range(int64_t N, int k, int nt) {
  constexpr int64_t L = Vectorized<T>::size();
  const int64_t units = (N + L - 1) / L;
  const int64_t u0 = units * k / nt, u1 = units * (k + 1) / nt;
  return {std::min(N, u0 * L), std::min(N, u1 * L)};
}

// Threads for one call's time loop: a split adds a barrier per step, so it pays only
// from enough multiply-adds (B*4H*P) per step. LSTM_FAST_CPU_SPLIT_MIN overrides the
// threshold (0: always split, and no solo fallback).
int64_t split_min() {
  static const int64_t min_work = [] {
    const char* env = std::getenv("LSTM_FAST_CPU_SPLIT_MIN");
    // 2 threads lost at 1024 and won from 4096 on the 2-core EPYC (bench/NOTES_cpp.md#split-threshold)
    return env ? std::atoll(env) : int64_t(8192);
  }();
  return min_work;
}

// Solo fallback. When the threads of a split call slept at its barriers for more
// than half the loop's wall time (their partners were preempted: the cores are
// shared), the following calls of the process run on one thread for a while, then
// one split call tries again; the pause doubles while the retries keep failing
// (bench/NOTES_cpp.md#preempted-threads).
constexpr int64_t kSoloMinNs = 250'000'000, kSoloMaxNs = 4'000'000'000;
std::atomic<int64_t> g_solo_until_ns{0}, g_solo_pause_ns{kSoloMinNs};
// the team of the split call that stalled last: what a long loop may still use while solo
std::atomic<int> g_stalled_team{1};
bool solo_active() { return split_min() > 0 && now_ns() < g_solo_until_ns.load(std::memory_order_relaxed); }

// CPUs the OS gives the process: min(its affinity mask, the cgroup's CFS quota
// rounded down, at least 1), read once. The same policy as lstm_fast/_threads.py's
// os_thread_limit (which numba uses); the op's schema does not carry it.
int os_thread_limit() {
  static const int limit = [] {
    int n = (int)std::max<long>(1, sysconf(_SC_NPROCESSORS_ONLN));
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = std::max(1, CPU_COUNT(&set));
#endif
    auto quota_cpus = [](double quota, double period) { return std::max(1, (int)(quota / period)); };
    std::ifstream v2("/sys/fs/cgroup/cpu.max");
    std::string q;
    double period = 0;
    if (v2 >> q >> period) {
      if (q != "max" && period > 0) n = std::min(n, quota_cpus(std::stod(q), period));
      return n;
    }
    for (const char* dir : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}) {
      std::ifstream fq(std::string(dir) + "/cpu.cfs_quota_us"), fp(std::string(dir) + "/cpu.cfs_period_us");
      double quota = 0;
      if (fq >> quota && fp >> period && quota > 0 && period > 0) return std::min(n, quota_cpus(quota, period));
    }
    return n;
  }();
  return limit;
}

// How a time loop's threads share it. By hidden units, every thread works on every
// row and a barrier per step publishes h_t. By batch rows, each thread runs the whole
// recurrence of its own rows and the threads meet once, at the end: no per-step
// barrier, at the price of every thread streaming all of W_hh. On the 2-core EPYC rows
// won from 4 rows a thread, units at 2 (bench/NOTES_cpp.md#rows-split).
struct LoopSplit {
  int threads = 1;
  bool by_rows = false;
  // by rows: work[b] = steps taken by rows 0..b-1 (a packed batch's first rows take
  // part in more steps), so the threads get contiguous rows of about equal work
  std::vector<int64_t> work;
};

// When the rows split pays: from 4 rows a thread, and while all of W_hh fits one
// core's L2 (1 MiB on the EPYC; H=512 lost up to 0.95x, H=1024 0.59x at 4 and 16
// MiB). LSTM_FAST_CPU_SPLIT_BY=rows or units forces one kind (tests cover both).
constexpr int64_t kRowsPerThread = 4, kRowsMaxWeightBytes = int64_t(1) << 20;

// While solo, a loop of at least this many multiply-adds still splits by rows: it
// pays once the loop outlasts the milliseconds a preempted or sleeping thread takes
// to join. Under two spinners, T=100 B=16 I=H=128 (0.21 G in its forward) ran 26-40
// ms a step so against 24-34 solo; B=32 I=H=256 (1.7 G) 119-154 against 148-205.
// 2^29 sits between them (bench/NOTES_cpp.md#rows-split).
constexpr int64_t kSoloRowsWork = int64_t(1) << 29;

// The split of a loop with input size I projected inside it (0 for gx given).
// solo_guarded: the caller runs under SoloTorchThreads (the backward), whose one
// torch thread is not the user's choice.
LoopSplit loop_split(const Plan& p, int64_t elem_bytes, int64_t I, bool solo_guarded) {
  if (omp_in_parallel() || p.B * 4 * p.H * p.P < split_min()) return {};
  const bool solo = solo_active();
  const int64_t torch_threads = at::get_num_threads();
  int64_t stalled = g_stalled_team.load(std::memory_order_relaxed);
  if (!solo_guarded && torch_threads < stalled) {  // the user asked for fewer since
    stalled = torch_threads;
    g_stalled_team.store((int)stalled, std::memory_order_relaxed);
  }
  int64_t nt = solo && solo_guarded ? stalled : torch_threads;
  nt = std::min<int64_t>(solo ? std::min(nt, stalled) : nt, os_thread_limit());
  if (nt <= 1) return {};
  static const std::string forced = [] {
    const char* env = std::getenv("LSTM_FAST_CPU_SPLIT_BY");
    return std::string(env ? env : "");
  }();
  const bool pays = p.B >= kRowsPerThread * nt && 4 * p.H * p.P * elem_bytes <= kRowsMaxWeightBytes;
  const bool rows = forced.empty() ? pays : forced == "rows";
  if (solo && !(rows && p.N * 4 * p.H * (p.P + I) >= kSoloRowsWork)) return {};
  LoopSplit split;
  split.threads = (int)nt;
  split.by_rows = rows;
  if (split.by_rows) {
    std::vector<int64_t> rows_active(p.B + 1, 0);  // steps with exactly a rows active
    for (const int64_t a : p.active) ++rows_active[a];
    split.work.assign(p.B + 1, 0);
    int64_t steps = p.T;  // steps in which row b takes part: those with more than b rows
    for (int64_t b = 0; b < p.B; ++b) {
      steps -= rows_active[b];
      split.work[b + 1] = split.work[b] + steps;
    }
  }
  return split;
}

// The part of a time loop that thread k of a team of nt owns: hidden units [j0, j1)
// and state columns [p0, p1), of batch rows [b0, b1). team: the threads a step's
// barrier waits for (1 when split by rows).
struct ThreadShare {
  int team = 1;
  int64_t j0 = 0, j1 = 0, p0 = 0, p1 = 0, b0 = 0, b1 = 0;
  // this thread's rows of a step whose rows 0..active-1 take part
  std::pair<int64_t, int64_t> rows(int64_t active) const { return {std::min(b0, active), std::min(b1, active)}; }
};

// Shares by the team OpenMP granted, which may be smaller than split.threads.
template <typename T>
ThreadShare thread_share(const LoopSplit& split, int64_t B, int64_t H, int64_t P) {
  const int nt = omp_get_num_threads(), k = omp_get_thread_num();
  ThreadShare my;
  if (split.by_rows) {
    // the first row at which the work done reaches part k of the total
    auto bound = [&](int part) {
      const int64_t target = split.work[B] * part / nt;
      return int64_t(std::lower_bound(split.work.begin(), split.work.end(), target) - split.work.begin());
    };
    my.j1 = H;
    my.p1 = P;
    my.b0 = k == 0 ? 0 : bound(k);
    my.b1 = k == nt - 1 ? B : bound(k + 1);
  } else {
    my.team = nt;
    std::tie(my.j0, my.j1) = split_range<T>(H, k, nt);
    std::tie(my.p0, my.p1) = split_range<T>(P, k, nt);
    my.b1 = B;
  }
  return my;
}

// Split by rows, the threads meet only when their rows are done: one done early
// sleeps at the futex barrier rather than spinning at OpenMP's, so the loop's clock
// sees the wait of a thread whose partner was preempted.
inline void meet_at_end(const LoopSplit& split, StepBarrier& barrier) {
  if (split.by_rows) barrier.arrive_and_wait(omp_get_num_threads());
}

// While the solo fallback is on, an op's ATen calls (the weight-gradient GEMMs) run
// on one thread too: torch's parallel regions wait for a preempted pool thread just
// as the split loop did (bench/NOTES_cpp.md#preempted-threads).
class SoloTorchThreads {
 public:
  SoloTorchThreads() {
    if (!solo_active() || omp_in_parallel()) return;
    prev_ = at::get_num_threads();
    if (prev_ > 1) at::set_num_threads(1);
  }
  ~SoloTorchThreads() {
    if (prev_ > 1) at::set_num_threads(prev_);
  }
  SoloTorchThreads(const SoloTorchThreads&) = delete;
  SoloTorchThreads& operator=(const SoloTorchThreads&) = delete;

 private:
  int prev_ = 0;
};

// A split call stalled when its threads got less than half the CPU time they had and
// lost at least a scheduler tick's worth: waking an idle team costs tens of
// microseconds, a preemption milliseconds (bench/NOTES_cpp.md#preempted-threads).
constexpr int64_t kStallMinNs = 1'000'000;

// After a split call of nt threads that together got `cpu` ns of CPU time in `wall` ns.
void note_split(int nt, int64_t cpu, int64_t wall) {
  if (nt <= 1 || split_min() == 0) return;
  const int64_t lost = nt * wall - cpu;
  if (2 * cpu < nt * wall && lost > kStallMinNs) {
    const int64_t pause = g_solo_pause_ns.load(std::memory_order_relaxed);
    g_stalled_team.store(nt, std::memory_order_relaxed);
    g_solo_until_ns.store(now_ns() + pause, std::memory_order_relaxed);
    g_solo_pause_ns.store(std::min(2 * pause, kSoloMaxNs), std::memory_order_relaxed);
  } else {
    g_solo_pause_ns.store(kSoloMinNs, std::memory_order_relaxed);
  }
}

inline int64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// Wall time of one time loop and the CPU time its threads got (each thread adds its
// own through a Share). A thread preempted, or asleep at a barrier because its
// partner was, runs less than the wall time: note_split() judges from that.
class LoopClock {
 public:
  explicit LoopClock(int nt) : nt_(nt), t0_(now_ns()) {}
  class Share {
   public:
    explicit Share(LoopClock& clock) : clock_(clock), t0_(thread_cpu_ns()) {}
    ~Share() { clock_.cpu_.fetch_add(thread_cpu_ns() - t0_, std::memory_order_relaxed); }
    Share(const Share&) = delete;
    Share& operator=(const Share&) = delete;

   private:
    LoopClock& clock_;
    int64_t t0_;
  };
  void finish() const { note_split(nt_, cpu_.load(std::memory_order_relaxed), now_ns() - t0_); }

 private:
  int nt_;
  int64_t t0_;
  std::atomic<int64_t> cpu_{0};
};

// The fused input projection is computed for at most this many gx elements (all
// threads together) at a time, as lstm_fast/backends/base.py's BLOCK_ELEMENTS:
// memory stays bounded whatever T is.
constexpr int64_t kBlockElements = int64_t(1) << 22;

// Data of one forward call, for forward_loop: contiguous, distinct buffers.
template <typename T>
struct ForwardData {
  // Per-step tensors are read as [rows, width] (Plan: padded or packed).
  // gx [rows,4H], or nullptr when x is given: then x [rows,I] @ w_ih^T [4H,I] +
  // bias ([4H] or nullptr) is computed by each thread for its own rows and gate columns
  const T* gx = nullptr;
  const T *x = nullptr, *w_ih = nullptr, *bias = nullptr;
  int64_t I = 0;
  const T* h0 = nullptr;                     // [B,P]
  T* c = nullptr;                            // [B,H] in: c0, out: c_n (inactive rows keep theirs)
  const T *w_hh = nullptr, *w_hr = nullptr;  // [4H,P]; [P,H] or nullptr
  T* y = nullptr;                            // [rows,P] out
  T *gates = nullptr, *cells = nullptr;      // [rows,4H], [rows,H] out, or both nullptr
  T* hpre = nullptr;                         // [B,H] scratch when w_hr is set
  // Regularisers (StepMasks in lstm.h), each nullptr when off: rmask [B,P] with
  // hm [2][B,P] (h_{t-1} * rmask for even and odd steps, both h0 * rmask on
  // entry); zc [rows,H], zh [rows,P] per step.
  const T *rmask = nullptr, *zc = nullptr, *zh = nullptr;
  T* hm = nullptr;
};

// Forward time loop. Each thread owns batch rows, or hidden units [j0, j1) (and,
// with a projection, output columns [p0, p1)) with one barrier per step (ThreadShare).
template <typename T>
void forward_loop(const Plan& p, const ForwardData<T>& d) {
  const int64_t B = p.B, H = p.H, P = p.P, G = 4 * H;
  const LoopSplit split = loop_split(p, sizeof(T), d.x ? d.I : 0, false);
  StepBarrier barrier;
  LoopClock clock(split.threads);
#pragma omp parallel num_threads(split.threads)
  {
    const LoopClock::Share share(clock);
    const ThreadShare my = thread_share<T>(split, B, H, P);
    const int nt = my.team;  // for the per-step barriers
    const int64_t j0 = my.j0, j1 = my.j1, p0 = my.p0, p1 = my.p1;
    const int64_t nj = j1 - j0, M = 4 * nj;
    // Slab column q*nj + jj is W_hh row q*H + j0 + jj: the four gates of this
    // thread's units side by side, so z comes out in [i | f | g | o] blocks.
    Slab<T> s_hh, s_hr;
    pack_slab(s_hh, 0, P, M, 1, [&](int64_t m) { return d.w_hh + ((m / nj) * H + j0 + m % nj) * P; });
    if (d.w_hr) pack_slab(s_hr, 1, H, p1 - p0, 1, [&](int64_t m) { return d.w_hr + (p0 + m) * H; });
    std::vector<T> z(B * M);
    // With x: this thread's gate columns of the input projection, [rows, M] in z's
    // column order, bias added, for one block of steps at a time (kBlockElements).
    std::unique_ptr<T[]> gxc;
    Slab<T> s_ih;
    // by rows, a thread projects its own rows step by step
    const int64_t block = split.by_rows ? 1 : std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, B * G));
    int64_t gx_lo = 0;  // the first row gxc holds
    if (d.x && M > 0) {
      pack_slab(s_ih, 2, d.I, M, 1, [&](int64_t m) { return d.w_ih + ((m / nj) * H + j0 + m % nj) * d.I; });
      gxc.reset(new T[std::min(p.T, block) * B * M]);
    }
    auto project = [&](int64_t s0) {
      // consecutive steps are consecutive time indices, so their rows are one range
      int64_t lo = p.N, hi = 0;
      for (int64_t s = s0; s < std::min(p.T, s0 + block); ++s) {
        const auto [n0, n1] = my.rows(p.active[s]);
        if (n1 == n0) continue;
        lo = std::min(lo, p.row0[p.order[s]] + n0);
        hi = std::max(hi, p.row0[p.order[s]] + n1);
      }
      gx_lo = lo;
      const int64_t rows = std::max<int64_t>(0, hi - lo);
      // rows in blocks whose slice of x (~128 KiB of float) stays in L2 across the
      // panels: the block size numba's gemm.slab_gemm measured (bench/NOTES_cpp.md#input-projection)
      const int64_t rb = std::max<int64_t>(6, (int64_t(32768) / std::max<int64_t>(d.I, 1)) / 6 * 6);
      for (int64_t r = 0; r < rows; r += rb) {
        slab_gemm<T>(std::min(rb, rows - r), d.x + (lo + r) * d.I, d.I, s_ih, gxc.get() + r * M, M);
      }
      if (d.bias) {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t q = 0; q < 4; ++q) {
            T* dst = gxc.get() + r * M + q * nj;
            const T* src = d.bias + q * H + j0;
            for (int64_t jj = 0; jj < nj; ++jj) dst[jj] += src[jj];
          }
      }
    };
    for (int64_t s = 0; s < p.T; ++s) {
      const int64_t t = p.order[s], r0 = p.row0[t];
      if (gxc && s % block == 0) project(s);
      // this thread's rows [n0, n1) of the step's active rows
      const auto [n0, n1] = my.rows(p.active[s]);
      if (n1 == n0) continue;
      // h_{t-1}: the previous step's output, and h0 for rows starting at this step
      const int64_t with_prev = p.rows_with_prev(s), wp = std::clamp(with_prev, n0, n1);
      const T* yprev = with_prev > 0 ? d.y + p.row0[p.order[s - 1]] * P : nullptr;
      if (d.rmask) {  // masked h_{t-1} of every row (h0's for rows starting here)
        slab_gemm<T>(n1 - n0, d.hm + (s % 2) * B * P + n0 * P, P, s_hh, z.data(), M);
      } else {
        if (wp > n0) slab_gemm<T>(wp - n0, yprev + n0 * P, P, s_hh, z.data(), M);
        if (n1 > wp) slab_gemm<T>(n1 - wp, d.h0 + wp * P, P, s_hh, z.data() + (wp - n0) * M, M);
      }
      T* hout = d.w_hr ? d.hpre : d.y + r0 * P;
      // input projection rows of this step: row stride, gate stride
      const T* gxt = d.x ? gxc.get() + (r0 - gx_lo) * M : d.gx + r0 * G + j0;
      const int64_t g_row = d.x ? M : G, g_gate = d.x ? nj : H;
      T* cellt = d.cells ? d.cells + r0 * H + j0 : nullptr;
      T* gt = d.gates ? d.gates + r0 * G + j0 : nullptr;
      const T* zct = d.zc ? d.zc + r0 * H + j0 : nullptr;
      for (int64_t b = n0; b < n1 && nj > 0; ++b) {
        forward_row<T>(z.data() + (b - n0) * M, nj, gxt + b * g_row, g_gate, d.c + b * H + j0, hout + b * H + j0,
                       cellt ? cellt + b * H : nullptr, gt ? gt + b * G : nullptr, H, nj, zct ? zct + b * H : nullptr);
      }
      if (d.w_hr) {
        barrier.arrive_and_wait(nt);
        slab_gemm<T>(n1 - n0, d.hpre + n0 * H, H, s_hr, d.y + (r0 + n0) * P + p0, P);
      }
      if (d.zh || d.rmask) {
        // this thread's state columns of y_t: hidden zoneout, then the masked copy for step s + 1
        const int64_t e0 = d.w_hr ? p0 : j0, e1 = d.w_hr ? p1 : j1;
        T* next = d.rmask ? d.hm + ((s + 1) % 2) * B * P : nullptr;
        for (int64_t b = n0; b < n1; ++b) {
          T* yb = d.y + (r0 + b) * P;
          if (d.zh) {
            const T* zhb = d.zh + (r0 + b) * P;
            const T* hp = b < with_prev ? yprev + b * P : d.h0 + b * P;
            for (int64_t e = e0; e < e1; ++e) yb[e] += zhb[e] * (hp[e] - yb[e]);
          }
          if (next) {
            for (int64_t e = e0; e < e1; ++e) next[b * P + e] = yb[e] * d.rmask[b * P + e];
          }
        }
      }
      barrier.arrive_and_wait(nt);
    }
    meet_at_end(split, barrier);
  }
  clock.finish();
}

// Data of one backward call, for backward_loop: contiguous, distinct buffers.
template <typename T>
struct BackwardData {
  const T* grad_y = nullptr;                   // [rows,P] (per-step tensors as in ForwardData)
  T* dh = nullptr;                             // [B,P] in: grad_hn, out: d_h0
  T* dc = nullptr;                             // [B,H] in: grad_cn, out: d_c0
  const T *gates = nullptr, *cells = nullptr;  // [rows,4H], [rows,H] from forward
  const T* c0 = nullptr;                       // [B,H]
  const T *w_hh = nullptr, *w_hr = nullptr;    // [4H,P]; [P,H] or nullptr
  T* d_gx = nullptr;                           // [rows,4H] out
  T *d_r = nullptr, *hpre = nullptr;           // [rows,P], [rows,H] out, only with w_hr
  T* dhbuf = nullptr;                          // [B,H] scratch, only with w_hr
  // Regularisers as in ForwardData (rmask [B,P], zc, zh per step), nullptr when
  // off; carry [B,P] scratch with zh: the gradient reaching h_{t-1} directly.
  const T *rmask = nullptr, *zc = nullptr, *zh = nullptr;
  T* carry = nullptr;
};

// Backward time loop, processing order reversed. Each thread owns batch rows, or
// hidden units [j0, j1) for the gate derivatives and columns [p0, p1) of dh_{t-1} =
// dgates @ W_hh; without a projection the two ranges coincide (P = H), so a
// thread reads next step only the dh columns it wrote: one barrier per step
// (all of dgates before the product).
template <typename T>
void backward_loop(const Plan& p, const BackwardData<T>& d) {
  const int64_t B = p.B, H = p.H, P = p.P, G = 4 * H;
  const LoopSplit split = loop_split(p, sizeof(T), 0, true);
  StepBarrier barrier;
  LoopClock clock(split.threads);
#pragma omp parallel num_threads(split.threads)
  {
    const LoopClock::Share share(clock);
    const ThreadShare my = thread_share<T>(split, B, H, P);
    const int nt = my.team;
    const int64_t j0 = my.j0, j1 = my.j1, p0 = my.p0, p1 = my.p1;
    const int64_t nj = j1 - j0;
    Slab<T> s_hh, s_hr;
    pack_slab(s_hh, 0, G, p1 - p0, P, [&](int64_t m) { return d.w_hh + p0 + m; });
    if (d.w_hr) pack_slab(s_hr, 1, P, nj, H, [&](int64_t m) { return d.w_hr + j0 + m; });
    for (int64_t s = p.T - 1; s >= 0; --s) {
      const int64_t t = p.order[s], r0 = p.row0[t];
      const auto [n0, n1] = my.rows(p.active[s]);
      if (n1 == n0) continue;
      // c_{t-1}: the previous step's cells, and c0 for rows starting at this step
      const int64_t with_prev = p.rows_with_prev(s);
      const T* cprev = s == 0 ? d.c0 : d.cells + p.row0[p.order[s - 1]] * H;
      const T* gyt = d.grad_y + r0 * P;
      const T* dh_in = d.dh;
      const T* gy_in = gyt;
      if (d.w_hr) {
        // d_r = dh + grad_y reaches y_t = W_hr h_pre; then back through W_hr.
        T* drt = d.d_r + r0 * P;
        for (int64_t b = n0; b < n1; ++b)
          for (int64_t e = p0; e < p1; ++e) drt[b * P + e] = d.dh[b * P + e] + gyt[b * P + e];
        if (d.zh) {  // h_t = zh h_{t-1} + (1 - zh) W_hr h_pre
          const T* zht = d.zh + r0 * P;
          for (int64_t b = n0; b < n1; ++b)
            for (int64_t e = p0; e < p1; ++e) {
              d.carry[b * P + e] = zht[b * P + e] * drt[b * P + e];
              drt[b * P + e] -= d.carry[b * P + e];
            }
        }
        barrier.arrive_and_wait(nt);
        slab_gemm<T>(n1 - n0, drt + n0 * P, P, s_hr, d.dhbuf + n0 * H + j0, H);
        dh_in = d.dhbuf;
        gy_in = nullptr;
      }
      const T* gt = d.gates + r0 * G + j0;
      const T* ct = d.cells + r0 * H + j0;
      T* dgt = d.d_gx + r0 * G;
      T* hpt = d.hpre ? d.hpre + r0 * H + j0 : nullptr;
      // hidden zoneout inside backward_row only without a projection (P = H: the same columns)
      const T* zct = d.zc ? d.zc + r0 * H + j0 : nullptr;
      const T* zht = d.zh && !d.w_hr ? d.zh + r0 * P + j0 : nullptr;
      for (int64_t b = n0; b < n1 && nj > 0; ++b) {
        const T* cp = (b < with_prev ? cprev : d.c0) + b * H + j0;
        backward_row<T>(gt + b * G, H, ct + b * H, cp, dh_in + b * H + j0, gy_in ? gy_in + b * P + j0 : nullptr,
                        d.dc + b * H + j0, dgt + b * G + j0, hpt ? hpt + b * H : nullptr, nj,
                        zct ? zct + b * H : nullptr, zht ? zht + b * P : nullptr, zht ? d.carry + b * P + j0 : nullptr);
      }
      barrier.arrive_and_wait(nt);
      // dh_{t-1}[:, p0:p1] = dgates @ W_hh[:, p0:p1]; with a projection the next
      // step's d_r reads only these columns before its barrier.
      slab_gemm<T>(n1 - n0, dgt + n0 * G, G, s_hh, d.dh + n0 * P + p0, P);
      if (d.rmask || d.zh) {  // h_{t-1} entered masked; zoneout's direct path adds to it
        for (int64_t b = n0; b < n1; ++b)
          for (int64_t e = p0; e < p1; ++e) {
            T v = d.dh[b * P + e];
            if (d.rmask) v *= d.rmask[b * P + e];
            if (d.zh) v += d.carry[b * P + e];
            d.dh[b * P + e] = v;
          }
      }
    }
    meet_at_end(split, barrier);
  }
  clock.finish();
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lstm_fast cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "lstm_fast cpu: float32 and float64 only, got ", t.scalar_type());
}

// Shared by lstm_forward_cpu (gx given) and lstm_forward_projected_cpu (x and
// its projection given; gx_ then only carries the sizes [T,B,4H] and the device).
Tensor5 forward_cpu(const Tensor& gx_, const Tensor& x_, const InputProjection& in, const LSTMState& init,
                    const RecurrentWeights& w, const SequenceLayout& seq, bool need_grad, const StepMasks& masks) {
  const Plan p = make_plan(gx_, init, w, seq);
  check_masks(p, masks, init.h);
  auto mask = [](const std::optional<Tensor>& t) { return StepMasks::on(t) ? t->contiguous() : Tensor(); };
  const Tensor rmask = mask(masks.recurrent), zc = mask(masks.zone_c), zh = mask(masks.zone_h);
  // both parities of the masked-state buffer start as h0 * mask (rows join with their h0)
  const Tensor hm = rmask.defined() ? init.h.mul(rmask).repeat({2, 1}).contiguous() : Tensor();
  const bool fused = x_.defined();
  check_forward_inputs(fused ? x_ : gx_, init.h);
  check_cpu(init.h, "h0");
  const bool proj = w.has_proj();
  const Tensor gx = fused ? Tensor() : gx_.contiguous(), h0 = init.h.contiguous(), w_hh = w.w_hh.contiguous();
  const Tensor x = fused ? x_.contiguous() : Tensor(), w_ih = fused ? in.w_ih.contiguous() : Tensor();
  const Tensor bias = in.bias.has_value() && in.bias->defined() ? in.bias->contiguous() : Tensor();
  const Tensor w_hr = proj ? w.w_hr->contiguous() : Tensor();
  const auto opts = h0.options();
  const int64_t B = p.B, H = p.H, P = p.P, G = 4 * H;
  Tensor y = at::empty(p.step_sizes(P), opts);
  Tensor c = init.c.clone(at::MemoryFormat::Contiguous);
  Tensor gates = need_grad ? at::empty(p.step_sizes(G), opts) : at::empty({0}, opts);
  Tensor cells = need_grad ? at::empty(p.step_sizes(H), opts) : at::empty({0}, opts);
  Tensor hpre = proj ? at::empty({B, H}, opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "lstm_forward_cpu", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    ForwardData<scalar_t> d;
    d.gx = ptr(gx);
    d.x = ptr(x);
    d.w_ih = ptr(w_ih);
    d.bias = ptr(bias);
    d.I = fused ? x.size(-1) : 0;
    d.h0 = ptr(h0);
    d.c = ptr(c);
    d.w_hh = ptr(w_hh);
    d.w_hr = ptr(w_hr);
    d.y = ptr(y);
    d.gates = need_grad ? ptr(gates) : nullptr;
    d.cells = need_grad ? ptr(cells) : nullptr;
    d.hpre = ptr(hpre);
    d.rmask = ptr(rmask);
    d.zc = ptr(zc);
    d.zh = ptr(zh);
    d.hm = ptr(hm);
    forward_loop<scalar_t>(p, d);
  });
  Tensor h_n = final_hidden(y, h0, p);
  return {y, h_n, c, gates, cells};
}

}  // namespace

Tensor5 lstm_forward_cpu(const Tensor& gx, const LSTMState& init, const RecurrentWeights& w, const SequenceLayout& seq,
                         bool need_grad, const StepMasks& masks) {
  check_cpu(gx, "gx");
  return forward_cpu(gx, Tensor(), InputProjection{}, init, w, seq, need_grad, masks);
}

Tensor5 lstm_forward_projected_cpu(const Tensor& x, const InputProjection& in, const LSTMState& init,
                                   const RecurrentWeights& w, const SequenceLayout& seq, bool need_grad,
                                   const StepMasks& masks) {
  const Tensor& w_ih = in.w_ih;
  const std::optional<Tensor>& bias = in.bias;
  check_cpu(x, "x");
  const bool packed = seq.batch_sizes.has_value() && seq.batch_sizes->defined();
  TORCH_CHECK(x.dim() == (packed ? 2 : 3), "lstm_fast: x must be ", packed ? "[N, I] (packed)" : "[T, B, I]", ", got ",
              x.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(1) == x.size(-1) && w_ih.size(0) % 4 == 0 && w_ih.size(0) > 0,
              "lstm_fast: w_ih must be [4H, I=", x.size(-1), "], got ", w_ih.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == w_ih.size(0)), "lstm_fast: bias must be [",
              w_ih.size(0), "], got ", has_bias ? bias->sizes() : at::IntArrayRef{});
  TORCH_CHECK(w_ih.scalar_type() == x.scalar_type() && w_ih.device() == x.device(),
              "lstm_fast: w_ih must share x's dtype and device");
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "lstm_fast: bias must share x's dtype and device");
  }
  // sizes [T, B, 4H] (or [N, 4H]) and x's device for the plan, without memory
  std::vector<int64_t> gx_sizes(x.sizes().begin(), x.sizes().end());
  gx_sizes.back() = w_ih.size(0);
  const Tensor shape = at::empty({1}, x.options()).expand(gx_sizes);
  return forward_cpu(shape, x, in, init, w, seq, need_grad, masks);
}

Tensor5 lstm_backward_cpu(const OutputGrads& grads, const Tensor& gates_, const Tensor& cells_, const Tensor& y_,
                          const LSTMState& init, const RecurrentWeights& w, const SequenceLayout& seq,
                          const StepMasks& masks) {
  const SoloTorchThreads solo;
  const Plan p = make_plan(gates_, init, w, seq);
  check_backward_inputs(p, grads, gates_, cells_, y_, init.h);
  check_masks(p, masks, init.h);
  auto mask = [](const std::optional<Tensor>& t) { return StepMasks::on(t) ? t->contiguous() : Tensor(); };
  const Tensor rmask = mask(masks.recurrent), zc = mask(masks.zone_c), zh = mask(masks.zone_h);
  check_cpu(init.h, "h0");
  const bool proj = w.has_proj();
  const Tensor grad_y = grads.y.contiguous(), gates = gates_.contiguous(), cells = cells_.contiguous();
  const Tensor y = y_.contiguous(), h0 = init.h.contiguous(), c0 = init.c.contiguous(), w_hh = w.w_hh.contiguous();
  const Tensor w_hr = proj ? w.w_hr->contiguous() : Tensor();
  const auto opts = h0.options();
  const int64_t B = p.B, H = p.H, P = p.P, G = 4 * H;
  Tensor d_gx = at::empty(p.step_sizes(G), opts);
  Tensor dh = grads.h_n.clone(at::MemoryFormat::Contiguous);
  Tensor dc = grads.c_n.clone(at::MemoryFormat::Contiguous);
  Tensor d_r = proj ? at::empty(p.step_sizes(P), opts) : Tensor();
  Tensor hpre = proj ? at::empty(p.step_sizes(H), opts) : Tensor();
  Tensor dhbuf = proj ? at::empty({B, H}, opts) : Tensor();
  Tensor carry = zh.defined() ? at::empty({B, P}, opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "lstm_backward_cpu", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    BackwardData<scalar_t> d;
    d.grad_y = ptr(grad_y);
    d.dh = ptr(dh);
    d.dc = ptr(dc);
    d.gates = ptr(gates);
    d.cells = ptr(cells);
    d.c0 = ptr(c0);
    d.w_hh = ptr(w_hh);
    d.w_hr = ptr(w_hr);
    d.d_gx = ptr(d_gx);
    d.d_r = ptr(d_r);
    d.hpre = ptr(hpre);
    d.dhbuf = ptr(dhbuf);
    d.rmask = ptr(rmask);
    d.zc = ptr(zc);
    d.zh = ptr(zh);
    d.carry = ptr(carry);
    backward_loop<scalar_t>(p, d);
  });
  auto [d_w_hh, d_w_hr] = weight_grads(d_gx, y, h0, d_r, hpre, p, w_hh, rmask);
  if (!proj) d_w_hr = at::empty({0}, opts);
  return {d_gx, dh, dc, d_w_hh, d_w_hr};
}

// Bernoulli(p) draws as 0/1 of like's dtype, element i from a splitmix64 hash of
// (seed, i): counter-based, so threads fill their own ranges and the result does not
// depend on the thread count. torch's bernoulli_ draws serially from one generator:
// the two zoneout masks of a T=100 B=32 H=256 call took 9.5 ms of its 10 ms overhead
// (bench/NOTES_cpp.md#zoneout-masks).
Tensor bernoulli_mask(const Tensor& like, at::IntArrayRef size, double p, int64_t seed) {
  check_cpu(like, "like");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "lstm_fast bernoulli_mask: p must be in [0, 1], got ", p);
  Tensor out = at::empty(size, like.options());
  // u < p with u = top 53 bits / 2^53: the threshold on the 53-bit integer itself
  const uint64_t threshold = p >= 1.0 ? (uint64_t(1) << 53) : uint64_t(std::ldexp(p, 53));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "bernoulli_mask", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        uint64_t z = uint64_t(seed) + uint64_t(i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        o[i] = (z >> 11) < threshold ? scalar_t(1) : scalar_t(0);
      }
    });
  });
  return out;
}

// For tests and tools: the split a float32 loop over a padded batch of these sizes
// would get now (threads, by rows), and note_split() fed a call's times, as a split
// call does after its loop.
std::tuple<int64_t, bool> cpu_loop_split(int64_t T, int64_t B, int64_t H, int64_t P, int64_t I, bool backward) {
  TORCH_CHECK(T >= 0 && B >= 0 && H > 0 && P > 0 && I >= 0, "lstm_fast cpu_loop_split: sizes must be T, B, I >= 0 and ",
              "H, P > 0, got T=", T, " B=", B, " H=", H, " P=", P, " I=", I);
  // a query: T steps and B rows of bookkeeping, and the work count in range
  TORCH_CHECK(T <= (int64_t(1) << 20) && B <= (int64_t(1) << 24) &&
                  double(T) * double(B) * 4.0 * double(H) * double(P + I) < 0x1p62,
              "lstm_fast cpu_loop_split: at most 2^20 steps, 2^24 rows and T*B*4H*(P+I) below 2^62");
  Plan p;
  p.T = T;
  p.B = B;
  p.H = H;
  p.P = P;
  p.N = T * B;
  p.active.assign(T, B);
  const LoopSplit split = loop_split(p, sizeof(float), I, backward);
  return {split.threads, split.by_rows};
}

void cpu_note_split(int64_t threads, int64_t cpu_ns, int64_t wall_ns) {
  TORCH_CHECK(threads >= 1 && threads <= 4096 && cpu_ns >= 0 && wall_ns >= 0,
              "lstm_fast cpu_note_split: threads must be in 1..4096 and the times >= 0, got threads=", threads,
              " cpu_ns=", cpu_ns, " wall_ns=", wall_ns);
  note_split((int)threads, cpu_ns, wall_ns);
}

// The vector instruction set the CPU kernels were compiled for (lstm_vec.h), for reports.
std::string cpu_vector_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "portable";
#endif
}

}  // namespace lstm_fast

// Whether the CPU loops run solo after a stalled split: LSTMRecurrence's backward then
// runs on one torch thread (lstm_fast/function.py, CppBackend.loops_solo).
TORCH_LIBRARY_FRAGMENT(lstm_fast, m) {
  m.def("cpu_loops_solo() -> bool", &lstm_fast::solo_active);
  m.def("cpu_loop_split(int T, int B, int H, int P, int I, bool backward) -> (int, bool)", &lstm_fast::cpu_loop_split);
  m.def("cpu_note_split(int threads, int cpu_ns, int wall_ns) -> ()", &lstm_fast::cpu_note_split);
  m.def("cpu_vector_isa() -> str", &lstm_fast::cpu_vector_isa);
  m.def("bernoulli_mask(Tensor like, int[] size, float p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(lstm_fast, CPU, m) {
  m.impl("lstm_forward", &lstm_fast::forward_op<lstm_fast::lstm_forward_cpu>);
  m.impl("lstm_forward_projected", &lstm_fast::forward_projected_op<lstm_fast::lstm_forward_projected_cpu>);
  m.impl("lstm_backward", &lstm_fast::backward_op<lstm_fast::lstm_backward_cpu>);
  m.impl("bernoulli_mask", &lstm_fast::bernoulli_mask);
}

// A mask is no function of `like` (only its dtype and device): autograd passes the op
// through, so its output never joins a graph, whatever the caller hands it.
TORCH_LIBRARY_IMPL(lstm_fast, Autograd, m) { m.impl("bernoulli_mask", torch::CppFunction::makeFallthrough()); }
