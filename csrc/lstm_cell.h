// The LSTM cell's pointwise math, written once for host C++ and CUDA device
// code: gate activations, the state update and the gate derivatives.
//
// V is a scalar (float, double: the CUDA kernels) or a vector of lanes
// (at::vec::Vectorized: the CPU loops). CellMath<V> supplies exp, tanh and
// fmadd for V; this header defines it for float and double, lstm_cpu.cpp for
// its vectors. Gate order i, f, g, o (torch.nn.LSTM's).
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define LSTM_FAST_HOST_DEVICE __host__ __device__
#else
#define LSTM_FAST_HOST_DEVICE
#endif

namespace lstm_fast {

template <typename V>
struct CellMath;

// Scalars: the C math library, exact to an ulp or two (no fast-math variants).
template <>
struct CellMath<float> {
  static LSTM_FAST_HOST_DEVICE float exp(float x) { return ::expf(x); }
  static LSTM_FAST_HOST_DEVICE float tanh(float x) { return ::tanhf(x); }
  static LSTM_FAST_HOST_DEVICE float fmadd(float a, float b, float c) { return a * b + c; }
};

template <>
struct CellMath<double> {
  static LSTM_FAST_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static LSTM_FAST_HOST_DEVICE double tanh(double x) { return ::tanh(x); }
  static LSTM_FAST_HOST_DEVICE double fmadd(double a, double b, double c) { return a * b + c; }
};

template <typename V>
LSTM_FAST_HOST_DEVICE inline V sigmoid(const V& x) {
  return V(1) / (V(1) + CellMath<V>::exp(-x));
}

// Forward: activations and new state from the gate pre-activations (z_i, z_f,
// z_g, z_o) and c_{t-1}: c_t = f * c_{t-1} + i * g, h_t = o * tanh(c_t).
template <typename V>
struct CellForward {
  V i, f, g, o, c, h;
};

template <typename V>
LSTM_FAST_HOST_DEVICE inline CellForward<V> cell_forward(const V& zi, const V& zf, const V& zg, const V& zo,
                                                         const V& c_prev) {
  using M = CellMath<V>;
  CellForward<V> r;
  r.i = sigmoid(zi);
  r.f = sigmoid(zf);
  r.g = M::tanh(zg);
  r.o = sigmoid(zo);
  r.c = M::fmadd(r.f, c_prev, r.i * r.g);
  r.h = r.o * M::tanh(r.c);
  return r;
}

// Backward: from the saved activations i, f, g, o, c_t and c_{t-1}, and the
// gradients dh reaching h_t and dc reaching c_t from later steps, the gradients
// of the four pre-activations, the gradient reaching c_{t-1}, and
// h_pre = o * tanh(c_t) (the input of the projection).
template <typename V>
struct CellBackward {
  V di, df, dg, do_, dc_prev, h_pre;
};

template <typename V>
LSTM_FAST_HOST_DEVICE inline CellBackward<V> cell_backward(const V& i, const V& f, const V& g, const V& o, const V& c,
                                                           const V& c_prev, const V& dh, const V& dc) {
  using M = CellMath<V>;
  const V one(1);
  const V tc = M::tanh(c);
  const V d_c = M::fmadd(dh * o, one - tc * tc, dc);
  CellBackward<V> r;
  r.di = d_c * g * i * (one - i);
  r.df = d_c * c_prev * f * (one - f);
  r.dg = d_c * i * (one - g * g);
  r.do_ = dh * tc * o * (one - o);
  r.dc_prev = d_c * f;
  r.h_pre = o * tc;
  return r;
}

}  // namespace lstm_fast
