// The cell math of lstm_cell.h on ATen's CPU vectors, shared by the
// sequence loops (lstm_cpu.cpp) and the single step (lstm_step.cpp).
// Include it before any other ATen header: it picks the vector ISA.
#pragma once

// Use ATen's AVX-512 or AVX2 Vectorized (and its Sleef exp/tanh) when the
// compiler was told the target has them (build_config.py adds the flags only
// when the building machine has them); otherwise Vectorized is ATen's portable
// version.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#endif

#include <ATen/cpu/vec/functional.h>  // vec_reduce_all
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "lstm_cell.h"

namespace lstm_fast {

using at::vec::Vectorized;

// The cell math of lstm_cell.h on ATen's vectors. float: ATen's inline
// polynomial exp_u20 (<= 20 ulp, no Sleef call) for both sigmoid and tanh,
// faster than Sleef's calls (bench/NOTES_cpp.md#activations). double: Sleef's
// 1-ulp exp/tanh (float64 is for exactness).
template <typename T>
struct CellMath<Vectorized<T>> {
  using V = Vectorized<T>;
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      // exp_u20 clamps its input with min/max, which turn NaN into a number: put
      // NaN back so that it propagates as in torch.nn.LSTM.
      return V::blendv(x.exp_u20(), x, x.isnan());
    } else {
      return x.exp();
    }
  }
  // tanh(x) = 2 sigmoid(2x) - 1 for float (absolute error ~1e-7 near 0).
  static V tanh(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      const V two(T(2));
      return two * sigmoid(two * x) - V(T(1));
    } else {
      return x.tanh();
    }
  }
  static V fmadd(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
};

}  // namespace lstm_fast
