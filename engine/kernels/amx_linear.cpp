// Float32 linear layer on Intel AMX: y[M, N] = x[M, K] W^T (+ b), each float32 operand taken as a
// sum of bfloat16 parts and the products of the parts summed in float32 by the tile unit.
// Built into the same extension as paged_decode.cpp (see cpu_ops.py); the ops exist on every
// build and answer amx_linear_available() == false where the compiler or the CPU lacks AMX.
//
// Why: on a CPU with AMX (Xeon Sapphire Rapids and later) one core's TDPBF16PS does ~2.9 TFLOP/s
// of bf16 products with float32 sums (a register-only loop on the 2-core Xeon of 2026-12-07),
// against ~210 GFLOP/s of float32 FMAs. A float32 matmul rebuilt from bf16 parts costs 3 or 6
// tile products per product and still comes out ahead: it is the "bf16x3" of PyTorch's
// float32_matmul_precision("high") and of oneDNN, and "bf16x6" with three parts. Measured there
// (the default model's 30 layers, distinct weights, 2 threads, against packed_linear.cpp side
// by side): at 64 rows 52 -> 40 ms (bf16x3; bf16x6 62 ms), at 2048 rows 1350 -> 670-800 ms
// (bf16x6 ~1160), at 1 row 20 -> 22 ms (both stream the same 4 bytes a weight). At 64 rows
// neither the tile unit (~40 % busy) nor memory (~11 GB/s) is the limit: the weight stream and
// the products hardly overlap, and software prefetch did not change that.
//
// Splits: v = v0 + v1 (+ v2), v0 = bf16(v), v1 = bf16(v - v0), v2 = bf16(v - v0 - v1), for x and
// W alike. Two parts hold 16 of float32's 24 significand bits; three hold all of them. The
// products kept are those above the dropped ones' size:
//   2 parts (bf16x3): x0 w0 + x0 w1 + x1 w0               (relative error ~2^-16 per product)
//   3 parts (bf16x6): + x0 w2 + x1 w1 + x2 w0             (~2^-24, float32's own rounding)
// Each product of two bf16 values is exact in float32; the tile unit sums pairs and accumulates
// in float32 (round to nearest even; bf16 denormals count as zero, ~1e-38, far below anything
// a model's activations hold).
//
// Layout: W [N, K] is packed as panels of 16 output columns, [P, Kt, S, 16, 32] bf16 (P = ceil(N
// / 16) rounded up to even, Kt = ceil(K / 32), S parts; zero-padded): for each 32-k step and
// part, the B tile of TDPBF16PS, whose row r holds (W[n, 2r], W[n, 2r + 1]) for n = 0..15
// ("VNNI" pairs). A panel is one contiguous stream in K order. Panels go in pairs (32 columns);
// a gated MLP's gate_up weight is packed as pairs of a gate panel and the up panel of the same
// 16 outputs.
//
// Tiles: 0-3 accumulate 2 row blocks (32 rows) x a panel pair in float32; 4-5 hold the row
// blocks' current part of x, 6-7 the pair's current part of W. Consecutive products go to
// different accumulators, so none waits on the previous one's result. K goes in blocks of 4 steps
// (the pair's block stays in L1 while every row pair of the chunk meets it), the sums resting in
// a per-thread scratch between blocks (stored and reloaded exactly). x is split once per call
// into S bf16 copies [M rounded up to 16, K rounded up to 32] (zero padding contributes 0).
// Threads split the panel pairs; x goes in chunks of rows whose parts (~1 MiB) stay in L2.
//
// Numerics: an output element is summed over k steps in increasing order, the products of a
// step in the order above, whatever M, the element's row block or the thread count: a request
// gets the same bits alone or in any batch, in prefill and in decode.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "vec16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__x86_64__)
#define PD_HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define PD_HAVE_AMX 0
#endif

namespace {

constexpr int64_t TILE_ROWS = 16;   // rows of x (and of a C tile) per row block
constexpr int64_t TILE_COLS = 16;   // output columns per panel (a C tile's 16 floats a row)
constexpr int64_t TILE_K = 32;      // k's per step: a row of an A tile, 32 bf16 = 64 bytes
constexpr int64_t TILE_ELEMS = TILE_ROWS * TILE_K;  // bf16 values in one A or B tile
constexpr int64_t PAIR_COLS = 2 * TILE_COLS;        // output columns of a panel pair
constexpr int64_t K_STEPS = 4;  // k steps per block of a panel pair (2-64 timed within noise)
// x rows per chunk: the chunk's bf16 parts (up to ~1 MiB) stay in L2 while every panel of the
// thread's range meets them.
constexpr int64_t CHUNK_BYTES = 1 << 20;

// bf16 of v rounded to nearest even, as its bits (inf stays inf, NaN NaN).
inline uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return static_cast<uint16_t>(u >> 16 | ((u & 0xffff) ? 0x40 : 0));
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// v -> parts[0..S): v ~ sum of the parts, each the bf16 rounding of what the previous left. A
// finite v that rounds up to inf (|v| > ~3.39e38) takes the truncation instead, so that it stays
// finite; an inf or NaN v leaves NaN in the later parts (inf - inf), and so NaN in the outputs it
// meets, where float32 products could give +-inf.
inline void split(float v, int S, uint16_t* parts, int64_t stride) {
  for (int s = 0; s < S; ++s) {
    uint16_t h = to_bf16(v);
    if ((h & 0x7f80) == 0x7f80 && std::isfinite(v)) {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      h = static_cast<uint16_t>(u >> 16);
    }
    parts[s * stride] = h;
    v -= from_bf16(h);
  }
}

void check_parts(int64_t S, const char* op) {
  TORCH_CHECK(S == 2 || S == 3, op, ": parts must be 2 (bf16x3) or 3 (bf16x6), got ", S);
}

// w [N, K] float32 -> [P, Kt, S, 16, 32] bf16 (see the layout above). panel_row(p, c) gives the
// row of w that column c of panel p takes, or -1 for a padding column.
template <class PanelRow>
at::Tensor pack_panels(const at::Tensor& w, int64_t P, int64_t S, PanelRow panel_row) {
  const int64_t K = w.size(1), Kt = (K + TILE_K - 1) / TILE_K;
  at::Tensor packed = at::zeros({P, Kt, S, TILE_ROWS, 2 * TILE_COLS}, w.options().dtype(at::kBFloat16));
  const at::Tensor wc = w.contiguous();
  const float* src = wc.const_data_ptr<float>();
  auto* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t c = 0; c < TILE_COLS; ++c) {
        const int64_t row = panel_row(p, c);
        if (row < 0) continue;
        const float* wr = src + row * K;
        for (int64_t k = 0; k < K; ++k) {
          // step k / 32, tile row (k % 32) / 2, column pair c, member k % 2
          uint16_t* at = dst + ((p * Kt + k / TILE_K) * S) * TILE_ELEMS +
                         ((k % TILE_K) / 2) * 2 * TILE_COLS + 2 * c + (k % 2);
          split(wr[k], static_cast<int>(S), at, TILE_ELEMS);
        }
      }
    }
  });
  return packed;
}

void check_weight(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2, op,
              ": a float32 CPU [out, in] weight expected");
}

at::Tensor pack_amx_weight(const at::Tensor& w, int64_t S) {
  check_weight(w, "pack_amx_weight");
  check_parts(S, "pack_amx_weight");
  const int64_t N = w.size(0), P = (N + 2 * TILE_COLS - 1) / (2 * TILE_COLS) * 2;  // pairs
  return pack_panels(w, P, S, [N](int64_t p, int64_t c) {
    const int64_t n = p * TILE_COLS + c;
    return n < N ? n : -1;
  });
}

// The gate and up halves of a gate_up weight [2I, K]: gate panel j at 2j, the up panel of the
// same output columns at 2j + 1.
at::Tensor pack_amx_gated_weight(const at::Tensor& w, int64_t S) {
  check_weight(w, "pack_amx_gated_weight");
  check_parts(S, "pack_amx_gated_weight");
  TORCH_CHECK(w.size(0) % 2 == 0, "pack_amx_gated_weight: the gate_up weight has ", w.size(0),
              " rows, not gate and up halves of equal size");
  const int64_t I = w.size(0) / 2, J = (I + TILE_COLS - 1) / TILE_COLS;
  return pack_panels(w, 2 * J, S, [I](int64_t p, int64_t c) {
    const int64_t n = (p / 2) * TILE_COLS + c;
    return n < I ? (p % 2) * I + n : -1;
  });
}

#if PD_HAVE_AMX

// The parts of xr[0, K) into d[s * stride + k], 16 floats per instruction: split() for each value
// (VCVTNEPS2BF16 rounds to nearest even, as to_bf16; it counts denormal inputs as zero, as the
// tile unit does anyway).
void split_row(const float* xr, int64_t K, int S, uint16_t* d, int64_t stride) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 live = K - k >= 16 ? static_cast<__mmask16>(0xffff)
                                       : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(live, xr + k);
    for (int s = 0; s < S; ++s) {
      __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
      // finite values rounded up to inf take the truncation, as in split()
      const __mmask16 to_inf =
          _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, _mm256_set1_epi16(0x7f80)), _mm256_set1_epi16(0x7f80)) &
          static_cast<__mmask16>(~_mm512_fpclass_ps_mask(v, 0x99));  // 0x99: NaNs and infs
      h = _mm256_mask_mov_epi16(h, to_inf, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
      _mm256_mask_storeu_epi16(d + s * stride + k, live, h);
      v = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
  }
}

// x [M, K] float32 -> S parts, each [Mpad, Kpad] bf16 (Mpad, Kpad: M, K rounded up to 16, 32;
// the padding zero).
at::Tensor split_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Mpad, int64_t Kpad,
                      int S) {
  at::Tensor parts = at::empty({S, Mpad, Kpad}, at::TensorOptions().dtype(at::kBFloat16));
  auto* dst = reinterpret_cast<uint16_t*>(parts.data_ptr<at::BFloat16>());
  const int64_t stride = Mpad * Kpad;
  at::parallel_for(0, Mpad, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      uint16_t* d = dst + m * Kpad;
      const int64_t done = m < M ? K : 0;
      if (m < M) split_row(x + m * ldx, K, S, d, stride);
      for (int s = 0; s < S; ++s) std::memset(d + s * stride + done, 0, (Kpad - done) * 2);
    }
  });
  return parts;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows of 64 bytes: C tiles 16 x 16 float32, A and B tiles 16 x 32 bf16.
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// Tile numbers are immediates of the instructions, so the tiles are named by macros: C tiles 0-3
// = (row block 0, panel 0), (0, 1), (1, 0), (1, 1); A tiles 4, 5 = row blocks 0, 1; B tiles 6,
// 7 = panels 0, 1. One pass adds A x B to the four sums: consecutive products go to different C
// tiles, so no product waits on the one before it (a TDPBF16PS takes several times its issue
// interval to finish).
#define PD_PRODUCTS()                   \
  _tile_dpbf16ps(0, 4, 6);              \
  _tile_dpbf16ps(1, 4, 7);              \
  if (R > 1) {                          \
    _tile_dpbf16ps(2, 5, 6);            \
    _tile_dpbf16ps(3, 5, 7);            \
  }

// c[i, j] (i < 16 R, j < 32; row stride 32) (+)= sum over k of x[i, k] W[k, j] for R row blocks
// of the split x at a (rows lda bf16 apart, parts part_stride apart) and steps [0, kts) of the
// panel pair b0, b1 (each [kts, S, 16, 32]); `first` starts the sums at 0, otherwise from c. Per
// k step the products go part of x by part of W in the order of the header: (0, 0), (0, 1),
// [(0, 2)], (1, 0), [(1, 1)], [(2, 0)].
template <int R, int S>
void pair_kernel(const uint16_t* a, int64_t lda, int64_t part_stride, const uint16_t* b0,
                 const uint16_t* b1, int64_t kts, bool first, float* c) {
  constexpr int64_t c_stride = PAIR_COLS * 4, c_block = TILE_ROWS * PAIR_COLS;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    if (R > 1) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c, c_stride);
    _tile_loadd(1, c + TILE_COLS, c_stride);
    if (R > 1) {
      _tile_loadd(2, c + c_block, c_stride);
      _tile_loadd(3, c + c_block + TILE_COLS, c_stride);
    }
  }
  const int64_t a_stride = lda * 2, row_block = TILE_ROWS * lda;
  for (int64_t kt = 0; kt < kts; ++kt) {
    const uint16_t* ak = a + kt * TILE_K;
    const uint16_t* bk0 = b0 + kt * S * TILE_ELEMS;
    const uint16_t* bk1 = b1 + kt * S * TILE_ELEMS;
#pragma GCC unroll 3
    for (int ap = 0; ap < S; ++ap) {
      _tile_loadd(4, ak + ap * part_stride, a_stride);
      if (R > 1) _tile_loadd(5, ak + ap * part_stride + row_block, a_stride);
#pragma GCC unroll 3
      for (int bp = 0; bp < S - ap; ++bp) {
        _tile_loadd(6, bk0 + bp * TILE_ELEMS, 64);
        _tile_loadd(7, bk1 + bp * TILE_ELEMS, 64);
        PD_PRODUCTS()
      }
    }
  }
  _tile_stored(0, c, c_stride);
  _tile_stored(1, c + TILE_COLS, c_stride);
  if (R > 1) {
    _tile_stored(2, c + c_block, c_stride);
    _tile_stored(3, c + c_block + TILE_COLS, c_stride);
  }
}
#undef PD_PRODUCTS

// Rows [m0, m1) of the split x (a multiple of 16) against the panel pair b0, b1 -> c [rows, 32],
// K in blocks of K_STEPS steps: a block of the pair (16-24 KiB) stays in L1 while every row pair
// meets it, and the sums wait in c between blocks. (Software prefetch of the next blocks, 1 to
// 16 blocks ahead, into L1 or L2, made no difference beyond the noise at 64 or 2048 rows.)
void rows_pair(int S, const uint16_t* a, int64_t lda, int64_t part_stride, int64_t m0, int64_t m1,
               const uint16_t* b0, const uint16_t* b1, int64_t Kt, float* c) {
  for (int64_t kt0 = 0; kt0 < Kt; kt0 += K_STEPS) {
    const int64_t kts = std::min(K_STEPS, Kt - kt0);
    const uint16_t* bk0 = b0 + kt0 * S * TILE_ELEMS;
    const uint16_t* bk1 = b1 + kt0 * S * TILE_ELEMS;
    for (int64_t m = m0; m < m1; m += 2 * TILE_ROWS) {
      const bool two = m1 - m > TILE_ROWS;
      const uint16_t* am = a + m * lda + kt0 * TILE_K;
      float* cm = c + (m - m0) * PAIR_COLS;
      if (S == 2) {
        two ? pair_kernel<2, 2>(am, lda, part_stride, bk0, bk1, kts, kt0 == 0, cm)
            : pair_kernel<1, 2>(am, lda, part_stride, bk0, bk1, kts, kt0 == 0, cm);
      } else {
        two ? pair_kernel<2, 3>(am, lda, part_stride, bk0, bk1, kts, kt0 == 0, cm)
            : pair_kernel<1, 3>(am, lda, part_stride, bk0, bk1, kts, kt0 == 0, cm);
      }
    }
  }
}

bool request_amx() {
  // Linux hands out the 8 KiB tile state only to processes that ask (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); the grant covers every thread of the process.
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

#endif  // PD_HAVE_AMX

bool amx_linear_available() {
#if PD_HAVE_AMX
  static const bool ok = request_amx();
  return ok;
#else
  return false;
#endif
}

struct Problem {
  int64_t M, K, Kt, Mpad, Kpad, S, mc;
};

Problem shape(const at::Tensor& x, const at::Tensor& packed, int64_t in_features, const char* op) {
  TORCH_CHECK(amx_linear_available(), op, ": this build or CPU has no AMX (amx_linear_available)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, op,
              ": x must be a float32 CPU [rows, in] tensor");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 5 && packed.size(3) == TILE_ROWS &&
                  packed.size(4) == 2 * TILE_COLS && packed.is_contiguous(),
              op, ": the weight must come from pack_amx_weight / pack_amx_gated_weight");
  Problem pr;
  pr.M = x.size(0);
  pr.K = x.size(1);
  pr.Kt = packed.size(1);
  pr.S = packed.size(2);
  check_parts(pr.S, op);
  TORCH_CHECK((in_features + TILE_K - 1) / TILE_K == pr.Kt, op, ": in_features ", in_features,
              " do not match the packed weight's ", pr.Kt, " steps of ", TILE_K);
  TORCH_CHECK(pr.K == in_features, op, ": x has ", pr.K, " features, the weight ", in_features);
  pr.Mpad = (pr.M + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
  pr.Kpad = pr.Kt * TILE_K;
  const int64_t row_bytes = std::max<int64_t>(1, pr.Kpad * pr.S * 2);  // K = 0: no steps
  pr.mc = std::max<int64_t>(2 * TILE_ROWS, CHUNK_BYTES / row_bytes / (2 * TILE_ROWS) * (2 * TILE_ROWS));
  return pr;
}

#if PD_HAVE_AMX
// Splits x into its parts, then, on the threads (which share out the panel pairs), hands each
// pair's sums for each chunk of rows to epilogue(pair, first row, rows, c [rows, 32]).
template <class Epilogue>
void for_each_pair(const at::Tensor& x, const at::Tensor& packed, const Problem& pr, int64_t pairs,
                   const Epilogue& epilogue) {
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int S = static_cast<int>(pr.S);
  const at::Tensor parts = split_rows(xc.const_data_ptr<float>(), xc.stride(0), pr.M, pr.K, pr.Mpad, pr.Kpad, S);
  const auto* a = reinterpret_cast<const uint16_t*>(parts.const_data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>());
  const int64_t panel = pr.Kt * pr.S * TILE_ELEMS;
  at::parallel_for(0, pairs, 1, [&](int64_t q0, int64_t q1) {
    configure_tiles();
    std::vector<float> c(pr.mc * PAIR_COLS);
    for (int64_t mc = 0; mc < pr.Mpad; mc += pr.mc) {
      const int64_t mend = std::min(pr.Mpad, mc + pr.mc), rows = std::min(pr.M, mend) - mc;
      for (int64_t q = q0; q < q1; ++q) {
        rows_pair(S, a, pr.Kpad, pr.Mpad * pr.Kpad, mc, mend, wp + 2 * q * panel,
                  wp + (2 * q + 1) * panel, pr.Kt, c.data());
        epilogue(q, mc, rows, c.data());
      }
    }
    _tile_release();
  });
}
#endif

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                      int64_t K, int64_t N) {
  const Problem pr = shape(x, packed, K, "amx_linear");
  const int64_t P = packed.size(0);
  TORCH_CHECK(P % 2 == 0 && N > (P - 2) * TILE_COLS && N <= P * TILE_COLS, "amx_linear: ", N,
              " output features do not match the packed weight's ", P, " panels of ", TILE_COLS);
  at::Tensor y = at::empty({pr.M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N,
                "amx_linear: bias must be float32 with ", N, " values");
    b = bias->reshape({N}).contiguous();
  }
  if (pr.M == 0) return y;
  if (pr.K == 0) return b.defined() ? y.copy_(b.expand({pr.M, N})) : y.zero_();
#if PD_HAVE_AMX
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  for_each_pair(x, packed, pr, P / 2, [&](int64_t q, int64_t m0, int64_t rows, const float* c) {
    const int64_t col0 = q * PAIR_COLS, cols = std::min(PAIR_COLS, N - col0);
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = yp + (m0 + r) * N + col0;
      const float* src = c + r * PAIR_COLS;
      if (bp != nullptr) {
        for (int64_t j = 0; j < cols; ++j) dst[j] = src[j] + bp[col0 + j];
      } else {
        std::memcpy(dst, src, cols * sizeof(float));
      }
    }
  });
#endif
  return y;
}

at::Tensor amx_gated_linear(const at::Tensor& x, const at::Tensor& packed, int64_t K, int64_t I) {
  const Problem pr = shape(x, packed, K, "amx_gated_linear");
  TORCH_CHECK(packed.size(0) % 2 == 0, "amx_gated_linear: the weight must come from pack_amx_gated_weight");
  const int64_t J = packed.size(0) / 2;
  TORCH_CHECK(I > (J - 1) * TILE_COLS && I <= J * TILE_COLS, "amx_gated_linear: ", I,
              " output features do not match the packed weight's ", J, " panel pairs of ", TILE_COLS);
  at::Tensor y = at::empty({pr.M, I}, x.options());
  if (pr.M == 0) return y;
  if (pr.K == 0) return y.zero_();  // silu(0) * 0
#if PD_HAVE_AMX
  float* yp = y.data_ptr<float>();
  // a row of c: the 16 gate sums, then the 16 up sums
  for_each_pair(x, packed, pr, J, [&](int64_t j, int64_t m0, int64_t rows, const float* c) {
    const int64_t cols = std::min<int64_t>(TILE_COLS, I - j * TILE_COLS);
    for (int64_t r = 0; r < rows; ++r) {
      const float* cr = c + r * PAIR_COLS;
      silu_mul_row(cr, cr + TILE_COLS, yp + (m0 + r) * I + j * TILE_COLS, cols);
    }
  });
#endif
  return y;
}

}  // namespace

#ifndef PD_NS
#define PD_NS pdserve
#endif

TORCH_LIBRARY_FRAGMENT(PD_NS, m) {
  m.def("amx_linear_available() -> bool", &amx_linear_available);  // no tensor to dispatch on
  m.def("pack_amx_weight(Tensor w, int parts) -> Tensor");
  m.def("pack_amx_gated_weight(Tensor w, int parts) -> Tensor");
  m.def("amx_linear(Tensor x, Tensor packed, Tensor? bias, int in_features, int out_features) -> Tensor");
  m.def("amx_gated_linear(Tensor x, Tensor packed, int in_features, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(PD_NS, CPU, m) {
  m.impl("pack_amx_weight", &pack_amx_weight);
  m.impl("pack_amx_gated_weight", &pack_amx_gated_weight);
  m.impl("amx_linear", &amx_linear);
  m.impl("amx_gated_linear", &amx_gated_linear);
}
