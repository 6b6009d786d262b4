// 16-float vector values and a vectorised exp, shared by the kernels of this directory.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

// 16 floats as one value (GCC/Clang vector extension): one AVX-512 register, two AVX2 ones, four
// SSE/NEON ones; the compiler picks the instructions for -march.
typedef float vec16 __attribute__((vector_size(16 * sizeof(float))));

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

typedef int32_t ivec16 __attribute__((vector_size(16 * sizeof(int32_t))));

// exp of 16 floats, relative error < 1e-7 (Cephes expf polynomial on x = n ln2 + r). Arguments
// below -87.3 give ~1e-38 instead of 0, which is harmless here: they only scale terms against a
// running maximum that contributes exp(0) = 1. NaN stays NaN. Written on vector values because
// gcc does not vectorise the scalar form reliably (its clamps turn into branches).
inline vec16 exp16(vec16 x) {
  const vec16 lo = vec16{} - 87.3f, hi = vec16{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vec16 shifter = vec16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vec16 n = (x * 1.44269504088896341f + shifter) - shifter;
  vec16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec16 p = vec16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec16 bits = (__builtin_convertvector(n, ivec16) + 127) << 23;  // 2^n
  return p * __builtin_bit_cast(vec16, bits);
}

// o[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i] for i < n, every element through
// exp16 (a partial last vector padded with zeros): an element's bits do not depend on where it
// sits, so the fused MLP epilogue (packed_linear.cpp) and silu_mul (fused_ops.cpp) agree.
inline void silu_mul_row(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vec16 x = load16(g + i);
    store16(o + i, x / (1.0f + exp16(-x)) * load16(u + i));
  }
  if (i < n) {
    float gt[16] = {}, ut[16] = {}, ot[16];
    std::memcpy(gt, g + i, (n - i) * sizeof(float));
    std::memcpy(ut, u + i, (n - i) * sizeof(float));
    const vec16 x = load16(gt);
    store16(ot, x / (1.0f + exp16(-x)) * load16(ut));
    std::memcpy(o + i, ot, (n - i) * sizeof(float));
  }
}

}  // namespace
