// Float32 linear layer on CPU over a weight packed once at load: y[M, N] = x[M, K] W^T (+ b).
// Built into the same extension as paged_decode.cpp (see cpu_ops.py).
//
// Why: every linear of a decode step has few rows (1 to ~256) against a weight that streams in
// from DRAM, since a model's weights are far larger than the caches. torch's sgemm on a plain
// weight reached ~140 GFLOP/s at 64 rows here, oneDNN on its own packed layout ~175 with the
// weights cold; this kernel reaches ~210 (2 threads, the default model's 30 layers at 64 rows),
// streams a single row at ~35 GB/s, and matches oneDNN at 2048 rows, so one packed copy serves
// every step.
//
// Layout: W [N, K] is kept as panels of NR output columns, [ceil(N / NR), K, NR] (the last panel
// zero-padded): a panel is one contiguous stream, read in K order.
//
// Micro-kernel: MR rows of x against one panel, MR x NV vector accumulators (8 x 3 of 16 floats
// with AVX-512, 4 x 3 of 8 with AVX2: as many as the register file holds next to the NV weight
// vectors and one broadcast). Per k it loads NV weight vectors, broadcasts MR x values and issues
// MR * NV FMAs.
//
// Loops: the threads split the panels (contiguous ranges, so each streams its own part of W);
// a thread goes over its panels in chunks of MC rows of x and, within a panel, blocks of KC
// k's, so that a panel block (KC x NR) and the x rows it meets (MC x KC) stay in L2 while every
// MR-row tile of the chunk reads them. The first tile of a block brings the block in from
// memory; while the later tiles run from L2, they request the next block of the thread's
// stream (prefetcht2), one line every few k's, spread evenly over those tiles: a burst of
// prefetches fills the line-fill buffers and stalls the FMAs. On the 2-core Xeon (AVX-512)
// of 2026-12-07, the default model's 30 layers and LM head at 64 rows went 217 -> 283
// GFLOP/s (79 -> 61 ms a decode step), at 2048 rows 1411 -> 1336 ms; on the AMD EPYC (AVX2)
// of 2026-11-24 prefetches issued in bursts had made them 4-9 % slower (the spread form was
// not measured there).
//
// Gated MLP (gated_linear): the gate_up weight is packed as pairs of panels, gate columns
// then the up columns of the same outputs, and a thread computes a pair into scratch and writes
// silu(gate) * up: the [M, 2I] gate_up output (25 MB a layer for a 2048-token prefill step) is
// never written to memory and read back.
//
// Numerics: every output is the sum over k in increasing order, one FMA chain (a K block
// continues the chain from the partial sum stored in y), plus the bias at the end. So a row's
// result does not depend on M, on its tile, its chunk or the thread count: a request gets the
// same bits alone or in any batch, in a prefill step or a decode step.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>

#include "vec16.h"

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register
constexpr int MR = 8;   // rows of x per tile
#else
constexpr int VW = 8;
constexpr int MR = 4;
#endif
constexpr int NV = 3;             // vectors of output columns per tile
constexpr int NR = VW * NV;       // output columns per panel
// Chunk and block sizes: 64 x 768 (196 KB of x) and a 768 x 48 panel block (147 KB) sit in a
// 1 MiB L2 with room to spare; 32-128 rows and 384-1536 k's timed within noise of this, but
// for 384, 5 % slower.
constexpr int64_t MC = 64;        // rows of x per chunk
constexpr int64_t KC_MAX = 768;   // k's per block, at most

typedef float vecw __attribute__((vector_size(VW * sizeof(float))));

inline vecw loadw(const float* p) {
  vecw v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storew(float* p, vecw v) { std::memcpy(p, &v, sizeof(v)); }

// One broadcast (a loop over the lanes, or {} + s, compiles to lane inserts or an extra add).
inline vecw splat(float s) {
#if defined(__AVX512F__)
  return vecw{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
#else
  return vecw{s, s, s, s, s, s, s, s};
#endif
}

struct Block {
  const float* w;        // [kc, NR] of one panel
  int kc;                // k's in this block
  bool first, last;      // the first / last block of the panel's K
  const float* bias;     // the panel's first bias value (added by the last block), or nullptr
  int cols;              // valid output columns of the panel (NR but for the last panel)
  const char* prefetch = nullptr;  // lines of the next block to request during this tile
  int prefetch_lines = 0;
};

// The next block of a thread's weight stream, [lines) of 64 bytes from `next`, handed out to the
// tiles of the current block after the first, `share` lines each.
struct StreamPrefetch {
  const char* next = nullptr;
  int64_t lines = 0, share = 0;

  // block: the floats of the next block (nullptr: none); tiles: MR-row tiles in this block.
  StreamPrefetch(const float* block, int64_t floats, int64_t tiles) {
    if (block == nullptr || tiles < 2) return;
    next = reinterpret_cast<const char*>(block);
    lines = floats * static_cast<int64_t>(sizeof(float)) / 64;
    share = (lines + tiles - 2) / (tiles - 1);
  }

  // Gives tile number `t` of the block its lines (none to the first, which waits on memory).
  void assign(Block& b, int64_t t) {
    b.prefetch_lines = 0;
    if (t == 0 || lines <= 0) return;
    b.prefetch = next;
    b.prefetch_lines = static_cast<int>(std::min(share, lines));
    next += 64 * b.prefetch_lines;
    lines -= b.prefetch_lines;
  }
};

// The block a thread reads after panel p's block at k0 (a weight packed as [panels, K, NR], the
// thread's panels p, p + step, ... below p1): the panel's next K block, else the first block of
// panel p + step, else nullptr. Its size in floats goes to *floats.
inline const float* next_block(const float* wp, int64_t K, int64_t kc, int64_t p, int64_t k0,
                               int64_t step, int64_t p1, int64_t* floats) {
  if (k0 + kc < K) {
    *floats = std::min(kc, K - k0 - kc) * NR;
    return wp + (p * K + k0 + kc) * NR;
  }
  if (p + step >= p1) return nullptr;
  *floats = std::min(kc, K) * NR;
  return wp + (p + step) * K * NR;
}

// out = src[0:cols] as NV vectors, zero-padded past cols (the last panel's partial row).
inline void load_cols(const float* src, int cols, vecw (&out)[NV]) {
  if (cols == NR) {
    for (int v = 0; v < NV; ++v) out[v] = loadw(src + v * VW);
    return;
  }
  float tmp[NR] = {};
  std::memcpy(tmp, src, cols * sizeof(float));
  for (int v = 0; v < NV; ++v) out[v] = loadw(tmp + v * VW);
}

// y[r, 0:cols] (+)= sum_k x[r, k] * w[k, 0:cols] for the R rows of a tile; ldx/ldy row strides.
template <int R>
inline void tile(const float* __restrict x, int64_t ldx, float* __restrict y, int64_t ldy,
                 const Block& b) {
  vecw acc[R][NV];
  for (int r = 0; r < R; ++r) {
    if (b.first) {
      for (int v = 0; v < NV; ++v) acc[r][v] = vecw{};
    } else {
      load_cols(y + r * ldy, b.cols, acc[r]);
    }
  }
  const float* __restrict w = b.w;
  int pf_line = 0, pf_at = 0;
  const int pf_every = b.prefetch_lines > 0 ? std::max(1, b.kc / b.prefetch_lines) : 1;
  for (int k = 0; k < b.kc; ++k) {
    if (k == pf_at && pf_line < b.prefetch_lines) {
      __builtin_prefetch(b.prefetch + 64 * pf_line, 0, 1);  // prefetcht2
      ++pf_line;
      pf_at += pf_every;
    }
    vecw wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = loadw(w + k * NR + v * VW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vecw xr = splat(x[r * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += xr * wv[v];
    }
  }
  if (b.last && b.bias != nullptr) {
    vecw bv[NV];
    load_cols(b.bias, b.cols, bv);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += bv[v];
  }
  for (int r = 0; r < R; ++r) {
    if (b.cols == NR) {
      for (int v = 0; v < NV; ++v) storew(y + r * ldy + v * VW, acc[r][v]);
    } else {
      float tmp[NR];
      for (int v = 0; v < NV; ++v) storew(tmp + v * VW, acc[r][v]);
      std::memcpy(y + r * ldy, tmp, b.cols * sizeof(float));
    }
  }
}

template <int... Rs>
inline void tail_tile(int rows, const float* x, int64_t ldx, float* y, int64_t ldy, const Block& b,
                      std::integer_sequence<int, Rs...>) {
  // tile<rows> for rows in [1, MR): unrolled dispatch over the template argument
  ((rows == Rs + 1 ? tile<Rs + 1>(x, ldx, y, ldy, b) : void()), ...);
}

// All M rows of x against panels [p0, p1), K in blocks of kc.
void run_range(const float* x, int64_t ldx, const float* wp, const float* bias, float* y,
               int64_t N, int64_t K, int64_t kc, int64_t M, int64_t p0, int64_t p1) {
  for (int64_t mc = 0; mc < M; mc += MC) {
    const int64_t mend = std::min(M, mc + MC);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        Block b;
        b.w = wp + (p * K + k0) * NR;
        b.kc = static_cast<int>(std::min(kc, K - k0));
        b.first = k0 == 0;
        b.last = k0 + b.kc == K;
        b.bias = bias != nullptr ? bias + p * NR : nullptr;
        b.cols = static_cast<int>(std::min<int64_t>(NR, N - p * NR));
        float* yp = y + p * NR;
        int64_t floats = 0;
        const float* next = next_block(wp, K, kc, p, k0, 1, p1, &floats);
        StreamPrefetch pf(next, floats, (mend - mc + MR - 1) / MR);
        int64_t m = mc;
        for (; m + MR <= mend; m += MR) {
          pf.assign(b, (m - mc) / MR);
          tile<MR>(x + m * ldx + k0, ldx, yp + m * N, N, b);
        }
        if (m < mend) {
          pf.assign(b, (m - mc) / MR);
          tail_tile(static_cast<int>(mend - m), x + m * ldx + k0, ldx, yp + m * N, N, b,
                    std::make_integer_sequence<int, MR - 1>{});
        }
      }
    }
  }
}

// out[m, j * NR + c] = silu(g) * u for all M rows and the column panels j in [j0, j1) of a
// gated pair weight: per chunk of MC rows, the gate and up sums of a panel pair go to this
// thread's scratch (MC x NR each, in L1/L2), then through silu_mul_row into out. The sums are
// the same FMA chains as run_range's, so the result has packed_linear + silu_mul's bits.
void run_gated_range(const float* x, int64_t ldx, const float* wp, float* out, int64_t I, int64_t K,
                     int64_t kc, int64_t M, int64_t j0, int64_t j1) {
  alignas(64) float gate[MC * NR];
  alignas(64) float up[MC * NR];
  for (int64_t mc = 0; mc < M; mc += MC) {
    const int64_t mend = std::min(M, mc + MC);
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        Block b[2];
        for (int h = 0; h < 2; ++h) {
          b[h].w = wp + ((2 * j + h) * K + k0) * NR;
          b[h].kc = static_cast<int>(std::min(kc, K - k0));
          b[h].first = k0 == 0;
          b[h].last = k0 + b[h].kc == K;
          b[h].bias = nullptr;
          b[h].cols = NR;  // the scratch rows are NR wide; padded columns sum to 0
        }
        float* dst[2] = {gate, up};
        // the gate half's tiles request its next block, the up half's tiles the up one's
        const int64_t tiles = (mend - mc + MR - 1) / MR;
        auto stream = [&](int h) {
          int64_t floats = 0;
          const float* next = next_block(wp, K, kc, 2 * j + h, k0, 2, 2 * j1, &floats);
          return StreamPrefetch(next, floats, tiles);
        };
        StreamPrefetch pf[2] = {stream(0), stream(1)};
        int64_t m = mc;
        for (; m + MR <= mend; m += MR) {
          for (int h = 0; h < 2; ++h) {
            pf[h].assign(b[h], (m - mc) / MR);
            tile<MR>(x + m * ldx + k0, ldx, dst[h] + (m - mc) * NR, NR, b[h]);
          }
        }
        if (m < mend) {
          for (int h = 0; h < 2; ++h) {
            pf[h].assign(b[h], (m - mc) / MR);
            tail_tile(static_cast<int>(mend - m), x + m * ldx + k0, ldx, dst[h] + (m - mc) * NR, NR,
                      b[h], std::make_integer_sequence<int, MR - 1>{});
          }
        }
      }
      const int64_t cols = std::min<int64_t>(NR, I - j * NR);
      for (int64_t m = mc; m < mend; ++m) {
        silu_mul_row(gate + (m - mc) * NR, up + (m - mc) * NR, out + m * I + j * NR, cols);
      }
    }
  }
}

// K split into equal blocks of at most KC_MAX (a multiple of 16 but for the last).
int64_t k_block(int64_t K) {
  const int64_t blocks = (K + KC_MAX - 1) / KC_MAX;
  return std::max<int64_t>(16, ((K + blocks - 1) / blocks + 15) / 16 * 16);
}

// Panel `dst_panel` of dst [*, K, NR] <- rows [r0, r0 + cols) of src [*, K], transposed.
void pack_panel(const float* src, int64_t r0, int64_t cols, int64_t K, float* dst,
                int64_t dst_panel) {
  for (int64_t c = 0; c < cols; ++c) {
    const float* row = src + (r0 + c) * K;
    float* col = dst + dst_panel * K * NR + c;
    for (int64_t k = 0; k < K; ++k) col[k * NR] = row[k];
  }
}

void check_weight(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2, op,
              ": a float32 CPU [out, in] weight expected");
}

// w [N, K] float32 -> [ceil(N / NR), K, NR], zero-padded.
at::Tensor pack_linear_weight(const at::Tensor& w) {
  check_weight(w, "pack_linear_weight");
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor packed = at::zeros({P, K, NR}, w.options());
  const at::Tensor wc = w.contiguous();
  const float* src = wc.const_data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_panel(src, p * NR, std::min<int64_t>(NR, N - p * NR), K, dst, p);
  });
  return packed;
}

// The gate and up projections of a gated MLP, w [2I, K] (gate rows first, as the fused gate_up
// weight), -> [2 * ceil(I / NR), K, NR]: gate panel j at 2j, the up panel of the same columns
// at 2j + 1, so that one thread computes both halves of an output column.
at::Tensor pack_gated_weight(const at::Tensor& w) {
  check_weight(w, "pack_gated_weight");
  TORCH_CHECK(w.size(0) % 2 == 0, "pack_gated_weight: the gate_up weight has ", w.size(0),
              " rows, not gate and up halves of equal size");
  const int64_t I = w.size(0) / 2, K = w.size(1), P = (I + NR - 1) / NR;
  at::Tensor packed = at::zeros({2 * P, K, NR}, w.options());
  const at::Tensor wc = w.contiguous();
  const float* src = wc.const_data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, 2 * P, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j = q / 2, cols = std::min<int64_t>(NR, I - j * NR);
      pack_panel(src, (q % 2) * I + j * NR, cols, K, dst, q);
    }
  });
  return packed;
}

// x [M, K] float32 (rows may be strided), packed from pack_linear_weight, bias [N] or none.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "packed_linear: x must be a float32 CPU [rows, in] tensor");
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(2) == NR &&
                  packed.is_contiguous(),
              "packed_linear: the weight must come from pack_linear_weight");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "packed_linear: x has ", K, " features, the weight ",
              packed.size(1));
  TORCH_CHECK(N > (P - 1) * NR && N <= P * NR, "packed_linear: ", N,
              " output features do not match the packed weight's ", P, " panels of ", NR);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N,
                "packed_linear: bias must be float32 with ", N, " values");
    b = bias->reshape({N}).contiguous();
  }
  if (K == 0) return b.defined() ? y.copy_(b.expand({M, N})) : y.zero_();
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = packed.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = xc.stride(0), kc = k_block(K);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    run_range(xp, ldx, wp, bp, yp, N, K, kc, M, p0, p1);
  });
  return y;
}

// silu(x Wg^T) * (x Wu^T) [M, I] for x [M, K] and a weight from pack_gated_weight: the MLP's
// gate_up projection and its activation in one pass, without the [M, 2I] intermediate.
at::Tensor gated_linear(const at::Tensor& x, const at::Tensor& packed, int64_t I) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "gated_linear: x must be a float32 CPU [rows, in] tensor");
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(2) == NR &&
                  packed.size(0) % 2 == 0 && packed.is_contiguous(),
              "gated_linear: the weight must come from pack_gated_weight");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0) / 2;
  TORCH_CHECK(packed.size(1) == K, "gated_linear: x has ", K, " features, the weight ",
              packed.size(1));
  TORCH_CHECK(I > (P - 1) * NR && I <= P * NR, "gated_linear: ", I,
              " output features do not match the packed weight's ", P, " panel pairs of ", NR);
  at::Tensor y = at::empty({M, I}, x.options());
  if (M == 0) return y;
  if (K == 0) return y.zero_();  // silu(0) * 0
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = packed.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = xc.stride(0), kc = k_block(K);
  at::parallel_for(0, P, 1, [&](int64_t j0, int64_t j1) {
    run_gated_range(xp, ldx, wp, yp, I, K, kc, M, j0, j1);
  });
  return y;
}

}  // namespace

#ifndef PD_NS
#define PD_NS pdserve
#endif

TORCH_LIBRARY_FRAGMENT(PD_NS, m) {
  m.def("pack_linear_weight(Tensor w) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("pack_gated_weight(Tensor w) -> Tensor");
  m.def("gated_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(PD_NS, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
  m.impl("pack_gated_weight", &pack_gated_weight);
  m.impl("gated_linear", &gated_linear);
}
