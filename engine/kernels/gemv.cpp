// Batch-1 linear layer on CPU: y[n] = sum_k x[k] * w[n, k], float32, w row-major [N, K].
//
// Why: at batch 1 every decode step reads all weights once, so its speed is memory
// bandwidth. torch's matmul for a single row reaches ~10 GB/s here; this loop, eight weight
// rows per pass against one x vector in 16-wide registers, split over torch's intra-op
// threads, reaches 20-40 GB/s. Built into the same extension as paged_decode.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

void gemv_rows(const float* x, const float* w, float* y, int64_t begin, int64_t end, int64_t K) {
  const int64_t K16 = K / 16 * 16;
  int64_t n = begin;
  // Eight rows per pass: eight independent accumulators keep the FMA units busy while the
  // rows stream in, and rows 8-15 ahead are prefetched (non-temporal hint: read once).
  for (; n + 8 <= end; n += 8) {
    const float* w0 = w + n * K;
    v16 acc[8] = {};
    for (int64_t k = 0; k < K16; k += 16) {
      const v16 xv = load16(x + k);
      __builtin_prefetch(w0 + 8 * K + k, 0, 0);
      __builtin_prefetch(w0 + 12 * K + k, 0, 0);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) acc[r] += load16(w0 + r * K + k) * xv;
    }
    for (int r = 0; r < 8; ++r) {
      float s = hsum(acc[r]);
      for (int64_t k = K16; k < K; ++k) s += w0[r * K + k] * x[k];
      y[n + r] = s;
    }
  }
  for (; n < end; ++n) {
    const float* w0 = w + n * K;
    v16 a0 = {0};
    for (int64_t k = 0; k < K16; k += 16) a0 += load16(w0 + k) * load16(x + k);
    float s0 = hsum(a0);
    for (int64_t k = K16; k < K; ++k) s0 += w0[k] * x[k];
    y[n] = s0;
  }
}

void gemv(at::Tensor out, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dtype() == at::kFloat && w.dtype() == at::kFloat && out.dtype() == at::kFloat,
              "gemv: float32 only");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && w.dim() == 2 && x.size(1) == w.size(1),
              "gemv: x [1, K] and w [N, K] expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous() &&
                  out.numel() == w.size(0),
              "gemv: contiguous tensors and out [1, N] expected");
  const int64_t N = w.size(0), K = w.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  // grain 64 rows: each thread streams whole row blocks; threads split the weight matrix
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    gemv_rows(xp, wp, yp, begin, end, K);
  });
}

}  // namespace

#ifndef PD_NS
#define PD_NS pdserve
#endif

TORCH_LIBRARY_FRAGMENT(PD_NS, m) {
  m.def("gemv(Tensor(a!) out, Tensor x, Tensor w) -> ()");
}

TORCH_LIBRARY_IMPL(PD_NS, CPU, m) {
  m.impl("gemv", &gemv);
}
