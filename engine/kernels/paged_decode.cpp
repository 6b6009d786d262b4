// Fused paged decode attention for CPU (built by engine/kernels/cpu_ops.py).
//
// One query token per request attends to its context, read in place from the paged KV cache
// of one layer ([2, num_blocks, block_size, kv_heads, head_dim]) through the request's block
// table: no gathered copy and no mask. Only the first context_lens[n] positions are read, so
// block table entries past them (padding) and the unused tail of the last block are never
// touched.
//
// A work item is a request with all its kv heads (their rows are contiguous), or with a range
// of them when there are too few requests for the threads. The G = heads / kv_heads query
// heads of a kv head are attended together: every K/V row comes from memory once per group.
// Positions go in tiles of kTile with an online (streaming) softmax across tiles, in fp32
// whatever the storage dtype (float32; bfloat16 and float16 are converted per row).
//
// The arithmetic is written on 16-float vector values (GCC/Clang vector extensions) that the
// compiler maps onto -march's registers; nothing relies on -ffast-math or on auto-vectorised
// reductions, whose summation order can differ between the loop copies gcc generates: a
// request's result has the same bits whatever its batch, the thread count or alignment.
// Items are handed out dynamically (an atomic counter, longest contexts first) to
// at::parallel_for's threads, so the kernel follows torch.set_num_threads and runs inline
// with one thread.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "vec16.h"

namespace {

#ifndef KTILE
#define KTILE 32
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 2  // prefetcht1: into L2 (a tile of all heads does not fit L1)
#endif
constexpr int kTile = KTILE;  // positions per softmax update, a multiple of 16
static_assert(kTile % 16 == 0, "kTile must be a multiple of 16");

inline float exp1(float x) { return exp16(vec16{} + x)[0]; }

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define PD_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else  // older gcc: the same with a constant index vector
#define PD_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, ivec16{__VA_ARGS__})
#endif

// s[h * kTile + i] = q_h . k[i] for the 8 rows k[0..8) and the G query heads of a group
// (q [G, DC], DC a multiple of 16). The 8 dot products of a head are reduced together: three
// rounds of "add the two halves of every segment" that each merge two vectors, instead of
// eight horizontal sums.
template <int DC>
inline void group_scores8(const float* __restrict q, int G, const float* const* k,
                          float* __restrict s) {
  constexpr int C = DC / 16;
  for (int h = 0; h < G; ++h) {
    const float* qh = q + h * DC;
    vec16 qr[C];
    for (int c = 0; c < C; ++c) qr[c] = load16(qh + 16 * c);
    vec16 a[8];
    for (int i = 0; i < 8; ++i) {
      a[i] = qr[0] * load16(k[i]);
      for (int c = 1; c < C; ++c) a[i] += qr[c] * load16(k[i] + 16 * c);
    }
    // 16 partial sums of one row each -> 8 of two rows each
    vec16 b[4];
    for (int j = 0; j < 4; ++j) {
      b[j] = PD_SHUFFLE(a[2 * j], a[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             PD_SHUFFLE(a[2 * j], a[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    // -> 4 partial sums of four rows each
    vec16 c[2];
    for (int j = 0; j < 2; ++j) {
      c[j] = PD_SHUFFLE(b[2 * j], b[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
             PD_SHUFFLE(b[2 * j], b[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    }
    // -> 2 partial sums of all eight rows -> the 8 sums, in row order
    const vec16 d = PD_SHUFFLE(c[0], c[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                    PD_SHUFFLE(c[0], c[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    const vec16 e = PD_SHUFFLE(d, d, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
                    PD_SHUFFLE(d, d, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    std::memcpy(s + h * kTile, &e, 8 * sizeof(float));
  }
}

// Sum of the 16 lanes in a fixed order.
inline float hsum16(vec16 v) {
  const vec16 a = v + PD_SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  const vec16 b = a + PD_SHUFFLE(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  const vec16 c = b + PD_SHUFFLE(b, b, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  return c[0] + c[1];
}

// Runtime head_dim: s[h * kTile] = q_h . k, one row.
inline void group_scores1(const float* __restrict q, int G, const float* __restrict k,
                          float* __restrict s, int D) {
  for (int h = 0; h < G; ++h) {
    const float* qh = q + h * D;
    vec16 a = {};
    int d = 0;
    for (; d + 16 <= D; d += 16) a += load16(qh + d) * load16(k + d);
    float sum = hsum16(a);
    for (; d < D; ++d) sum += qh[d] * k[d];
    s[h * kTile] = sum;
  }
}

// acc[0:D] += sum_t p[t] * rows[t][0:D]; with DC > 0 the accumulator stays in registers.
template <int DC>
inline void accumulate_rows(float* __restrict acc, const float* __restrict p,
                            const float* const* rows, int tn, int d_rt) {
  if constexpr (DC > 0) {
    constexpr int C = DC / 16;
    vec16 a[C];
    for (int c = 0; c < C; ++c) a[c] = load16(acc + 16 * c);
    for (int t = 0; t < tn; ++t) {
      const float w = p[t];
      const float* v = rows[t];
      for (int c = 0; c < C; ++c) a[c] += w * load16(v + 16 * c);
    }
    for (int c = 0; c < C; ++c) store16(acc + 16 * c, a[c]);
  } else {
    for (int t = 0; t < tn; ++t) {
      const float w = p[t];
      const float* __restrict v = rows[t];
#pragma omp simd
      for (int d = 0; d < d_rt; ++d) acc[d] += w * v[d];
    }
  }
}

inline void prefetch_bytes(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, PREFETCH_LOCALITY);
}

template <int DC>
inline void scale_row(float* __restrict y, float a, int d_rt) {
  const int D = DC > 0 ? DC : d_rt;
  for (int d = 0; d < D; ++d) y[d] *= a;
}

template <typename scalar_t>
inline void to_float(float* __restrict dst, const scalar_t* __restrict src, int D) {
  for (int d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

struct Geometry {
  int64_t N, H, KV, G, D, BS, num_blocks, max_blocks;
  int64_t q_row_stride;  // elements between two requests' queries (heads within one contiguous)
  int64_t kv_which_stride, kv_block_stride, kv_tok_stride, kv_head_stride;
  int64_t bt_row_stride, bt_col_stride;
  bool bt_int32;  // block table entries are int32 (else int64)
};

// Per-thread scratch, sized once per call for all H query heads. Every buffer starts on a
// 64-byte boundary: vectorised loops peel by alignment, and results must not depend on
// where the allocator put a thread's scratch (same bits whatever the thread count).
struct Scratch {
  std::vector<float> mem;
  float *q, *acc, *s, *kbuf, *vbuf, *m, *l;
  Scratch(int64_t H, int64_t D) {
    auto round16 = [](int64_t x) { return (x + 15) / 16 * 16; };
    const int64_t sizes[] = {round16(H * D), round16(H * D), round16(H * kTile),
                             round16(kTile * D), round16(kTile * D), round16(H), round16(H)};
    mem.resize(std::accumulate(std::begin(sizes), std::end(sizes), int64_t{0}) + 16);
    float* p = mem.data();
    p += (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(float);
    float** bufs[] = {&q, &acc, &s, &kbuf, &vbuf, &m, &l};
    for (int i = 0; i < 7; ++i) {
      *bufs[i] = p;
      p += sizes[i];
    }
  }
};

// One work item: request n, kv heads [kv0, kv1).
struct Item {
  int64_t n = -1, kv0 = 0, kv1 = 0;
};

// The block id at table entry i of request n.
inline int64_t block_id(const Geometry& g, const void* bt, int64_t n, int64_t i) {
  const int64_t at = n * g.bt_row_stride + i * g.bt_col_stride;
  return g.bt_int32 ? static_cast<const int32_t*>(bt)[at] : static_cast<const int64_t*>(bt)[at];
}

// Maps positions [t0, t0 + tn) of request n to element offsets (K side; V is
// + kv_which_stride) of their first head's row.
inline void map_rows(const Geometry& g, const void* bt, int64_t n, int64_t t0, int tn, int64_t* r) {
  int64_t blk = t0 / g.BS, off = t0 % g.BS;
  int64_t base = block_id(g, bt, n, blk) * g.kv_block_stride;
  for (int t = 0; t < tn; ++t) {
    r[t] = base + off * g.kv_tok_stride;
    if (++off == g.BS && t + 1 < tn) {
      off = 0;
      base = block_id(g, bt, n, ++blk) * g.kv_block_stride;
    }
  }
}

// rows[t] = the float32 values of the D-long row at base + offsets[t], t < n: the row itself
// for float32 storage, else its conversion into buf (n * D floats).
template <typename scalar_t>
inline void float_rows(const scalar_t* base, const int64_t* offsets, int n, int D, float* buf,
                       const float** rows) {
  for (int t = 0; t < n; ++t) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      rows[t] = base + offsets[t];
    } else {
      to_float(buf + t * D, base + offsets[t], D);
      rows[t] = buf + t * D;
    }
  }
}

// Attends request it.n's query heads of kv heads [it.kv0, it.kv1) to its context.
//
// Memory: the K/V rows of the next tile (or, during the last tile, of the first tile of `after`,
// the item this thread does next) are prefetched a few rows at a time, the K rows between the
// score computations and the V rows between the accumulations, spread over the tile rather
// than in bursts: a burst stalls on the fill buffers and leaves the arithmetic waiting, and
// hardware prefetchers stop at the 4 KiB page boundaries that the scattered blocks cross.
template <typename scalar_t, int DC>
void attend_item(const Geometry& g, Scratch& sc, const scalar_t* __restrict q_all,
                 const scalar_t* __restrict kv, const void* bt,
                 const int64_t* __restrict ctx_lens, scalar_t* __restrict out_all, float scale,
                 Item it, Item after) {
  const int D = DC > 0 ? DC : static_cast<int>(g.D);
  const int G = static_cast<int>(g.G);
  const int64_t n = it.n;
  const int heads = static_cast<int>(it.kv1 - it.kv0);
  const int nh = heads * G;  // query heads of this item
  const int64_t ctx = ctx_lens[n];
  scalar_t* out = out_all + (n * g.H + it.kv0 * G) * D;
  if (ctx <= 0) {
    for (int64_t i = 0; i < static_cast<int64_t>(nh) * D; ++i) out[i] = static_cast<scalar_t>(0.f);
    return;
  }

  float* __restrict q = sc.q;
  float* __restrict acc = sc.acc;
  float* __restrict s = sc.s;
  float* __restrict m = sc.m;
  float* __restrict l = sc.l;
  const scalar_t* qn = q_all + n * g.q_row_stride + it.kv0 * G * D;
  for (int i = 0; i < nh * D; ++i) q[i] = static_cast<float>(qn[i]) * scale;
  std::fill(acc, acc + nh * D, 0.f);

  const scalar_t* kbase = kv + it.kv0 * g.kv_head_stride;
  const scalar_t* vbase = kbase + g.kv_which_stride;
  // Row offsets of the tile being computed and of the one being prefetched.
  int64_t rows[2][kTile];
  int cur = 0;
  int tn = static_cast<int>(std::min<int64_t>(kTile, ctx));
  map_rows(g, bt, n, 0, tn, rows[cur]);

  for (int64_t t0 = 0; t0 < ctx; t0 += kTile) {
    const int64_t* r = rows[cur];
    // what to prefetch during this tile: the next tile, or the next item's first one
    const int64_t* pr = rows[1 - cur];
    int ptn = 0, pheads = 0;
    const scalar_t* pk = nullptr;
    if (t0 + kTile < ctx) {
      ptn = static_cast<int>(std::min<int64_t>(kTile, ctx - t0 - kTile));
      map_rows(g, bt, n, t0 + kTile, ptn, rows[1 - cur]);
      pheads = heads;
      pk = kbase;
    } else if (after.n >= 0 && ctx_lens[after.n] > 0) {
      ptn = static_cast<int>(std::min<int64_t>(kTile, ctx_lens[after.n]));
      map_rows(g, bt, after.n, 0, ptn, rows[1 - cur]);
      pheads = static_cast<int>(after.kv1 - after.kv0);
      pk = kv + after.kv0 * g.kv_head_stride;
    }

    for (int j = 0; j < heads; ++j) {  // kv head it.kv0 + j and its G query heads
      const int64_t hoff = j * g.kv_head_stride;
      const int h0 = j * G;
      float* sg = s + h0 * kTile;
      // prefetch head j's rows of the prefetched tile: its K rows a few positions per score
      // step, its V rows a third per query head's accumulation (with both during the scores,
      // the bursts filled the miss buffers and the arithmetic waited: 0.92 vs 0.67 ms a layer
      // for 64 requests of 192 positions)
      const bool pf = j < pheads;
      int pf_k = 0, pf_v = 0;
      auto prefetch_rows = [&](int& next, int upto, int64_t which) {
        if (!pf) return;
        for (; next < std::min(upto, ptn); ++next) {
          prefetch_bytes(pk + pr[next] + hoff + which, D * sizeof(scalar_t));
        }
      };

      // scores s[h][t] = (scale * q_h) . k_t for the group's query heads
      const float* kf[kTile];
      float_rows(kbase + hoff, r, tn, D, sc.kbuf, kf);
      if constexpr (DC > 0) {
        const int padded = (tn + 7) & ~7;
        for (int t = tn; t < padded; ++t) kf[t] = kf[0];  // scores past tn are ignored
        for (int t = 0; t < padded; t += 8) {
          prefetch_rows(pf_k, t + 8, 0);
          group_scores8<DC>(q + h0 * D, G, kf + t, sg + t);
        }
      } else {
        for (int t = 0; t < tn; ++t) {
          prefetch_rows(pf_k, t + 1, 0);
          group_scores1(q + h0 * D, G, kf[t], sg + t, D);
        }
      }
      prefetch_rows(pf_k, kTile, 0);

      // online softmax: rescale the running sums to the new maximum, s <- exp(s - max)
      for (int h = h0; h < h0 + G; ++h) {
        float* sh = s + h * kTile;
        float tile_max = t0 == 0 ? -std::numeric_limits<float>::infinity() : m[h];
#pragma omp simd reduction(max : tile_max)
        for (int t = 0; t < tn; ++t) tile_max = std::max(tile_max, sh[t]);
        const float mx = tile_max;  // a plain value: the reduction variable lives in memory
        for (int t = tn; t < ((tn + 15) & ~15); ++t) sh[t] = -std::numeric_limits<float>::infinity();
        vec16 sum16 = {};
        for (int t = 0; t < tn; t += 16) {
          const vec16 p = exp16(load16(sh + t) - mx);  // 0 (well, 1e-38) for the padding
          store16(sh + t, p);
          sum16 += p;
        }
        // A fixed summation order (no `omp simd reduction`, whose order can differ between
        // the copies of a loop that gcc versions): the same bits whatever the batch or threads.
        const float sum = hsum16(sum16);
        if (t0 == 0) {
          l[h] = sum;
        } else {  // rescale unconditionally: a data-dependent branch here mispredicts often
          const float corr = exp1(m[h] - mx);
          l[h] = l[h] * corr + sum;
          scale_row<DC>(acc + h * D, corr, D);
        }
        m[h] = mx;
      }

      // acc[h] += sum_t p[h][t] * v_t
      const float* vf[kTile];
      float_rows(vbase + hoff, r, tn, D, sc.vbuf, vf);
      for (int h = h0; h < h0 + G; ++h) {
        prefetch_rows(pf_v, (h - h0 + 1) * kTile / G, g.kv_which_stride);
        accumulate_rows<DC>(acc + h * D, s + h * kTile, vf, tn, D);
      }
    }
    cur = 1 - cur;
    tn = ptn;
  }

  for (int h = 0; h < nh; ++h) {
    const float inv = 1.f / l[h];
    for (int d = 0; d < D; ++d) out[h * D + d] = static_cast<scalar_t>(acc[h * D + d] * inv);
  }
}

template <typename scalar_t, int DC>
void run(const Geometry& g, const scalar_t* q, const scalar_t* kv, const void* bt,
         const int64_t* ctx, scalar_t* out, float scale) {
  const int64_t max_threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // A work item is one request with all its heads (contiguous K/V rows), unless there are too
  // few requests to keep the threads busy: then each request's kv heads are split up.
  int64_t splits = 1;
  if (max_threads > 1 && g.N < 4 * max_threads) {
    splits = std::min<int64_t>(g.KV, (4 * max_threads + g.N - 1) / g.N);
  }
  const int64_t per = (g.KV + splits - 1) / splits;
  splits = (g.KV + per - 1) / per;
  const int64_t items = g.N * splits;
  const int64_t threads = std::min<int64_t>(max_threads, items);
  // Longest contexts first so that the dynamic hand-out balances the threads.
  std::vector<int64_t> order(g.N);
  std::iota(order.begin(), order.end(), 0);
  if (threads > 1) {
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return ctx[a] > ctx[b]; });
  }
  auto item = [&](int64_t i) {
    Item it;
    if (i < items) {
      it.n = order[i / splits];
      it.kv0 = (i % splits) * per;
      it.kv1 = std::min(g.KV, it.kv0 + per);
    }
    return it;
  };
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t, int64_t) {
    Scratch sc(g.H, g.D);
    // Each thread claims its next item before computing the current one, to prefetch it.
    int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    while (i < items) {
      const int64_t j = next.fetch_add(1, std::memory_order_relaxed);
      attend_item<scalar_t, DC>(g, sc, q, kv, bt, ctx, out, scale, item(i), item(j));
      i = j;
    }
  };
  if (threads > 1) {
    at::parallel_for(0, threads, 1, work);
  } else {
    work(0, 1);
  }
}

template <typename scalar_t>
void dispatch(const Geometry& g, const at::Tensor& q, const at::Tensor& kv, const void* bt,
              const int64_t* ctx, const at::Tensor& out, float scale) {
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kvp = kv.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  switch (g.D) {
    case 64: return run<scalar_t, 64>(g, qp, kvp, bt, ctx, op, scale);
    case 128: return run<scalar_t, 128>(g, qp, kvp, bt, ctx, op, scale);
    default: return run<scalar_t, 0>(g, qp, kvp, bt, ctx, op, scale);
  }
}

void check_tables(const Geometry& g, const void* bt, const int64_t* ctx) {
  for (int64_t n = 0; n < g.N; ++n) {
    TORCH_CHECK(ctx[n] >= 0 && ctx[n] <= g.max_blocks * g.BS, "paged_decode_attention: context ",
                ctx[n], " of request ", n, " does not fit ", g.max_blocks, " blocks of ", g.BS);
    const int64_t used = (ctx[n] + g.BS - 1) / g.BS;
    for (int64_t b = 0; b < used; ++b) {
      const int64_t id = block_id(g, bt, n, b);
      TORCH_CHECK(id >= 0 && id < g.num_blocks, "paged_decode_attention: block id ", id,
                  " of request ", n, " out of range [0, ", g.num_blocks, ")");
    }
  }
}

// out [N, H, D] (contiguous, written), q [N, H, D] (rows may be strided), kv_layer [2, num_blocks, block_size, KV, D]
// (last dim contiguous), block_tables [N, max_blocks] int32/int64, context_lens [N] int32/int64.
void paged_decode_attention(const at::Tensor& out, const at::Tensor& q_in, const at::Tensor& kv,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            double scale) {
  TORCH_CHECK(q_in.device().is_cpu() && kv.device().is_cpu() && out.device().is_cpu() &&
                  block_tables.device().is_cpu() && context_lens.device().is_cpu(),
              "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q_in.dim() == 3, "q must be [N, H, D]");
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2, "kv_layer must be [2, num_blocks, block_size, KV, D]");
  TORCH_CHECK(block_tables.dim() == 2, "block_tables must be [N, max_blocks]");
  TORCH_CHECK(context_lens.dim() == 1, "context_lens must be [N]");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "paged_decode_attention: float32, bfloat16 or float16 only, got ", dtype);
  TORCH_CHECK(kv.scalar_type() == dtype && out.scalar_type() == dtype,
              "q, kv_layer and out must have the same dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt || block_tables.scalar_type() == at::kLong,
              "block_tables must be int32 or int64");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt || context_lens.scalar_type() == at::kLong,
              "context_lens must be int32 or int64");

  Geometry g{};
  g.N = q_in.size(0);
  g.H = q_in.size(1);
  g.D = q_in.size(2);
  g.num_blocks = kv.size(1);
  g.BS = kv.size(2);
  g.KV = kv.size(3);
  g.max_blocks = block_tables.size(1);
  TORCH_CHECK(kv.size(4) == g.D, "head_dim of q (", g.D, ") and kv_layer (", kv.size(4), ") differ");
  TORCH_CHECK(g.KV > 0 && g.H % g.KV == 0, "query heads (", g.H, ") must be a multiple of kv heads (", g.KV, ")");
  g.G = g.H / g.KV;
  TORCH_CHECK(block_tables.size(0) == g.N && context_lens.size(0) == g.N,
              "block_tables / context_lens must have one row per query");
  TORCH_CHECK(out.sizes() == q_in.sizes() && out.is_contiguous(), "out must be a contiguous [N, H, D]");
  TORCH_CHECK(kv.stride(4) == 1, "kv_layer's head_dim must be contiguous");
  TORCH_CHECK(g.BS > 0, "block_size must be positive");
  if (g.N == 0) return;

  g.kv_which_stride = kv.stride(0);
  g.kv_block_stride = kv.stride(1);
  g.kv_tok_stride = kv.stride(2);
  g.kv_head_stride = kv.stride(3);
  g.bt_row_stride = block_tables.stride(0);
  g.bt_col_stride = block_tables.stride(1);
  // q is usually a view into the fused QKV output: rows strided, each row's heads contiguous
  const at::Tensor q = q_in.stride(2) == 1 && q_in.stride(1) == g.D ? q_in : q_in.contiguous();
  g.q_row_stride = q.stride(0);
  const at::Tensor ctx_t = context_lens.scalar_type() == at::kLong
                               ? context_lens.contiguous()
                               : context_lens.to(at::kLong).contiguous();
  const int64_t* ctx = ctx_t.const_data_ptr<int64_t>();
  g.bt_int32 = block_tables.scalar_type() == at::kInt;
  const void* bt = block_tables.const_data_ptr();
  check_tables(g, bt, ctx);

  const float s = static_cast<float>(scale);
  switch (dtype) {
    case at::kFloat: return dispatch<float>(g, q, kv, bt, ctx, out, s);
    case at::kBFloat16: return dispatch<c10::BFloat16>(g, q, kv, bt, ctx, out, s);
    case at::kHalf: return dispatch<c10::Half>(g, q, kv, bt, ctx, out, s);
    default: TORCH_CHECK(false, "unreachable");
  }
}

}  // namespace

#ifndef PD_NS  // the op namespace (benchmarks of variants build several)
#define PD_NS pdserve
#endif

TORCH_LIBRARY(PD_NS, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor kv_layer, Tensor block_tables, "
        "Tensor context_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(PD_NS, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
