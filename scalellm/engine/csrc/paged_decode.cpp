// Decode attention straight from the paged KV cache (CPU): no gathered copy of the context.
//
// One work item per (request b, K/V head h): its G = Hq / Hkv query heads share the head's K/V,
// so each K and V row is read once for all G of them.
//
//   scores[g, t] = scale * q[b, h*G + g, :] . K[block(b, t), t % bs, h, :]    t < context_len[b]
//   p[g, :]      = softmax(scores[g, :])                                    (float32)
//   out[b, h*G + g, :] = sum_t p[g, t] * V[block(b, t), t % bs, h, :]
//
// The layer's cache is the strided view [num_blocks, 2, block_size, Hkv, D] of the engine's
// block-major cache; only D must be contiguous. Arithmetic in float32 for float32 and bfloat16.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
void decode_kernel(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = kv.size(2), num_kv_heads = kv.size(3);
  const int64_t groups = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t qs_b = q.stride(0), qs_h = q.stride(1);
  const int64_t os_b = out.stride(0), os_h = out.stride(1);
  const int64_t s_blk = kv.stride(0), s_kv = kv.stride(1), s_tok = kv.stride(2), s_head = kv.stride(3);
  const T* q_ptr = q.data_ptr<T>();
  const T* kv_ptr = kv.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(groups * head_dim), acc(groups * head_dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      scores.assign(groups * len, 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        const T* src = q_ptr + b * qs_b + (h * groups + g) * qs_h;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = to_float(src[d]) * fscale;
      }
      for (int64_t t = 0; t < len; ++t) {
        const T* k = kv_ptr + table[t / block_size] * s_blk + (t % block_size) * s_tok + h * s_head;
        for (int64_t g = 0; g < groups; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * to_float(k[d]);
          scores[g * len + t] = dot;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        float* s = scores.data() + g * len;
        float peak = -INFINITY;
        for (int64_t t = 0; t < len; ++t) peak = s[t] > peak ? s[t] : peak;
        float total = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - peak);
          total += s[t];
        }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = kv_ptr + table[t / block_size] * s_blk + s_kv + (t % block_size) * s_tok + h * s_head;
        for (int64_t g = 0; g < groups; ++g) {
          const float p = scores[g * len + t];
          float* a = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * to_float(v[d]);
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        T* dst = out_ptr + b * os_b + (h * groups + g) * os_h;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(acc[g * head_dim + d]);
      }
    }
  });
}

void paged_decode(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv,
                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && kv.dim() == 5, "q/out [B, Hq, D], kv [N, 2, bs, Hkv, D]");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && kv.stride(4) == 1, "head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type() && out.scalar_type() == kv.scalar_type(), "dtype mismatch");
  TORCH_CHECK(q.size(1) % kv.size(3) == 0 && q.size(2) == kv.size(4), "head shapes do not match");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous(), "contiguous tables");
  if (q.scalar_type() == at::kFloat) {
    decode_kernel<float>(out, q, kv, block_tables, context_lens, scale);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_kernel<c10::BFloat16>(out, q, kv, block_tables, context_lens, scale);
  } else {
    TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
  }
}

}  // namespace

TORCH_LIBRARY(scalellm_cpu, m) {
  m.def("paged_decode(Tensor(a!) out, Tensor q, Tensor kv, Tensor block_tables, Tensor context_lens, float scale) -> ()");
  m.impl("paged_decode", c10::DispatchKey::CPU, paged_decode);
}
