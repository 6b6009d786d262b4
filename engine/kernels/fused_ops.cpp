// Small fused float32 ops of the Llama layer on CPU: residual add + RMSNorm, RoPE applied in
// place to the Q and K heads of the fused QKV output, the MLP's silu(gate) * up; and the write
// of a step's new K/V rows into their paged-cache slots (any dtype).
//
// Why: torch runs each of these as 4-8 separate ops (F.rms_norm alone is ~16 us for one row
// of 576 here); at batch 1 a step makes ~120 such calls, ~3 ms of a ~28 ms token. Here each is
// one pass over the rows, split over torch's intra-op threads when there are many rows.
// Built into the same extension as paged_decode.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "vec16.h"

namespace {

// Rows per thread chunk: below this a step's rows run on the calling thread (thread
// wake-up costs more than the work for one row of a few hundred floats).
constexpr int64_t kRowGrain = 16;

// residual[t] += delta[t] (if given); out[t] = residual[t] / rms(residual[t]) * weight.
void add_rms_norm(at::Tensor out, at::Tensor residual, const c10::optional<at::Tensor>& delta,
                  const at::Tensor& weight, double eps) {
  TORCH_CHECK(out.dtype() == at::kFloat && residual.dtype() == at::kFloat &&
                  weight.dtype() == at::kFloat,
              "add_rms_norm: float32 only");
  TORCH_CHECK(residual.dim() == 2 && out.sizes() == residual.sizes() &&
                  weight.dim() == 1 && weight.size(0) == residual.size(1),
              "add_rms_norm: residual/out [T, H] and weight [H] expected");
  TORCH_CHECK(out.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "add_rms_norm: contiguous tensors expected");
  const float* dp = nullptr;
  if (delta.has_value()) {
    TORCH_CHECK(delta->dtype() == at::kFloat && delta->sizes() == residual.sizes() &&
                    delta->is_contiguous(),
                "add_rms_norm: delta must be a contiguous float32 tensor shaped like residual");
    dp = delta->data_ptr<float>();
  }
  const int64_t T = residual.size(0), H = residual.size(1);
  float* rp = residual.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* r = rp + t * H;
      if (dp != nullptr) {
        const float* d = dp + t * H;
        for (int64_t i = 0; i < H; ++i) r[i] += d[i];
      }
      // Sixteen partial sums (the vector lanes), combined at the end, in float32 as torch does.
      float part[16] = {};
      const int64_t H16 = H / 16 * 16;
      for (int64_t i = 0; i < H16; i += 16)
        for (int j = 0; j < 16; ++j) part[j] += r[i + j] * r[i + j];
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += part[j];
      for (int64_t i = H16; i < H; ++i) sum += r[i] * r[i];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(H) + feps);
      float* o = op + t * H;
      for (int64_t i = 0; i < H; ++i) o[i] = wp[i] * (r[i] * inv);
    }
  });
}

// qkv [T, (Hq + 2 * Hkv) * D] (rows may be strided); rotates the first Hq + Hkv heads of each
// row in place, the HF "rotate half" layout: for i < D/2, with c = cos[pos, i], s = sin[pos, i],
//   x[i] <- x[i] * c - x[i + D/2] * s,   x[i + D/2] <- x[i + D/2] * c + x[i] * s.
void rope_(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos,
           const at::Tensor& sin, int64_t num_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dtype() == at::kFloat && cos.dtype() == at::kFloat && sin.dtype() == at::kFloat,
              "rope_: float32 only");
  TORCH_CHECK(positions.dtype() == at::kLong && positions.dim() == 1 &&
                  positions.size(0) == qkv.size(0) && positions.is_contiguous(),
              "rope_: positions [T] int64 expected");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) >= num_heads * head_dim,
              "rope_: qkv [T, >= heads * head_dim] with contiguous rows expected");
  TORCH_CHECK(head_dim % 2 == 0 && cos.dim() == 2 && cos.size(1) == head_dim / 2 &&
                  cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "rope_: cos/sin [max_pos, head_dim / 2] expected");
  const int64_t T = qkv.size(0), row_stride = qkv.stride(0), half = head_dim / 2;
  const int64_t max_pos = cos.size(0);
  float* xp = qkv.data_ptr<float>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_pos, "rope_: position ", pp[t], " outside [0, ",
                max_pos, ")");
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pp[t] * half;
      const float* s = sp + pp[t] * half;
      float* row = xp + t * row_stride;
      for (int64_t h = 0; h < num_heads; ++h) {
        float* x1 = row + h * head_dim;
        float* x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

// out[t, i] = silu(gu[t, i]) * gu[t, I + i] for gu [T, 2I] (the fused gate+up output):
// one pass instead of torch's silu, then mul, each over the whole tensor (silu_mul_row, with
// the vectorised exp16, relative error < 1e-7). Without the unfused path's pass over the gate_up
// output, packed_linear.cpp's gated_linear computes the same bits.
void silu_mul(at::Tensor out, const at::Tensor& gate_up) {
  TORCH_CHECK(out.dtype() == at::kFloat && gate_up.dtype() == at::kFloat, "silu_mul: float32 only");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous(),
              "silu_mul: gate_up must be a contiguous [T, 2 * I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == T && out.size(1) == I && out.is_contiguous(),
              "silu_mul: out must be a contiguous [T, I]");
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) silu_mul_row(gp + t * 2 * I, gp + t * 2 * I + I, op + t * I, I);
  });
}

// kv_layer [2, num_blocks, block_size, KV, D] (contiguous); k/v [T, KV, D] with each token's
// KV * D values contiguous (rows may be strided: views into the fused QKV output); slots [T]
// int64. kv_layer[0/1] flattened to [num_blocks * block_size, KV, D] gets row slots[t] = k/v[t].
// Two index_copy_ calls did this at ~30 us each for 64 tokens; here it is a few memcpys.
void store_kv(at::Tensor kv_layer, const at::Tensor& slots, const at::Tensor& k,
              const at::Tensor& v) {
  TORCH_CHECK(kv_layer.dim() == 5 && kv_layer.size(0) == 2 && kv_layer.is_contiguous(),
              "store_kv: kv_layer must be a contiguous [2, num_blocks, block_size, KV, D]");
  TORCH_CHECK(slots.dtype() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "store_kv: slots must be a contiguous [T] int64");
  const int64_t T = slots.size(0), KV = kv_layer.size(3), D = kv_layer.size(4);
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->dtype() == kv_layer.dtype(), "store_kv: k/v and kv_layer dtypes differ");
    TORCH_CHECK(t->dim() == 3 && t->size(0) == T && t->size(1) == KV && t->size(2) == D &&
                    t->stride(2) == 1 && t->stride(1) == D,
                "store_kv: k/v must be [T, KV, D] with each row's KV * D values contiguous");
  }
  const int64_t num_slots = kv_layer.size(1) * kv_layer.size(2);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "store_kv: slot ", sp[t], " outside [0, ",
                num_slots, ")");
  const int64_t esize = kv_layer.element_size();
  const int64_t row_bytes = KV * D * esize;
  char* kdst = static_cast<char*>(kv_layer.data_ptr());
  char* vdst = kdst + num_slots * row_bytes;
  const char* ksrc = static_cast<const char*>(k.data_ptr());
  const char* vsrc = static_cast<const char*>(v.data_ptr());
  const int64_t kstride = k.stride(0) * esize, vstride = v.stride(0) * esize;
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kdst + sp[t] * row_bytes, ksrc + t * kstride, row_bytes);
      std::memcpy(vdst + sp[t] * row_bytes, vsrc + t * vstride, row_bytes);
    }
  });
}

// out[n] = the index of row n's maximum, the first one on ties; a NaN counts as the largest
// value (torch.argmax's rule). torch's CPU argmax runs one row at a time without vectors:
// ~1.8 ms for a decode step's [64, 49152] logits here, against ~0.07 for its amax.
void argmax_rows(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) > 0 &&
                  x.stride(1) == 1,
              "argmax_rows: a float32 CPU [rows, n > 0] tensor with contiguous rows expected");
  TORCH_CHECK(out.dtype() == at::kLong && out.dim() == 1 && out.size(0) == x.size(0) &&
                  out.is_contiguous(),
              "argmax_rows: out must be a contiguous int64 [rows]");
  const int64_t N = x.size(0), V = x.size(1), ld = x.stride(0), V16 = V / 16 * 16;
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, N, kRowGrain / 4, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* row = xp + n * ld;
      // per lane: its maximum and where (strict >: the first), NaNs aside (a comparison with
      // NaN is false); and whether there is a NaN
      vec16 mx = vec16{} - std::numeric_limits<float>::infinity();
      ivec16 where = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, lane = where;
      ivec16 nan = {};
      for (int64_t i = 0; i < V16; i += 16) {
        const vec16 v = load16(row + i);
        const ivec16 gt = v > mx;
        mx = gt ? v : mx;
        where = gt ? lane : where;
        lane += 16;
        nan |= v != v;
      }
      float best = mx[0];
      int64_t at = where[0];
      bool any_nan = nan[0] != 0;
      for (int l = 1; l < 16; ++l) {
        if (mx[l] > best || (mx[l] == best && where[l] < at)) {
          best = mx[l];
          at = where[l];
        }
        any_nan |= nan[l] != 0;
      }
      for (int64_t i = V16; i < V; ++i) {  // after every vector index: strict >
        if (row[i] > best) {
          best = row[i];
          at = i;
        }
        any_nan |= std::isnan(row[i]);
      }
      if (any_nan) {
        at = 0;
        while (!std::isnan(row[at])) ++at;
      }
      op[n] = at;
    }
  });
}

}  // namespace

#ifndef PD_NS
#define PD_NS pdserve
#endif

TORCH_LIBRARY_FRAGMENT(PD_NS, m) {
  m.def("add_rms_norm(Tensor(a!) out, Tensor(b!) residual, Tensor? delta, Tensor weight, "
        "float eps) -> ()");
  m.def("rope_(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, int num_heads, "
        "int head_dim) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def("store_kv(Tensor(a!) kv_layer, Tensor slots, Tensor k, Tensor v) -> ()");
  m.def("argmax_rows(Tensor(a!) out, Tensor x) -> ()");
}

TORCH_LIBRARY_IMPL(PD_NS, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_", &rope_);
  m.impl("silu_mul", &silu_mul);
  m.impl("store_kv", &store_kv);
  m.impl("argmax_rows", &argmax_rows);
}
