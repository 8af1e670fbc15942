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

#include <algorithm>
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

constexpr int64_t kLanes = 16;  // one AVX-512 register of floats; the compiler vectorizes these loops

// Row of D values as float32: a copy for bfloat16, the row itself for float32.
inline const float* as_float(const float* row, int64_t, float*) { return row; }
inline const float* as_float(const c10::BFloat16* row, int64_t n, float* buf) {
  for (int64_t d = 0; d < n; ++d) buf[d] = to_float(row[d]);
  return buf;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  float total = 0.f;
  for (; d < n; ++d) total += a[d] * b[d];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// HEAD_DIM > 0 fixes the head size at compile time (fully unrolled rows); 0 reads it at run time.
template <typename T, int64_t HEAD_DIM>
void decode_kernel(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const int64_t batch = q.size(0), num_heads = q.size(1);
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : q.size(2);
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
    std::vector<float> qf(groups * head_dim), acc(groups * head_dim), row(head_dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      scores.resize(groups * len);
      for (int64_t g = 0; g < groups; ++g) {
        const T* src = q_ptr + b * qs_b + (h * groups + g) * qs_h;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = to_float(src[d]) * fscale;
      }
      for (int64_t first = 0; first < len; first += block_size) {
        const T* block = kv_ptr + table[first / block_size] * s_blk + h * s_head;
        const int64_t n = std::min(block_size, len - first);
        for (int64_t j = 0; j < n; ++j) {
          const float* k = as_float(block + j * s_tok, head_dim, row.data());
          for (int64_t g = 0; g < groups; ++g)
            scores[g * len + first + j] = dot(qf.data() + g * head_dim, k, head_dim);
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
      for (int64_t first = 0; first < len; first += block_size) {
        const T* block = kv_ptr + table[first / block_size] * s_blk + s_kv + h * s_head;
        const int64_t n = std::min(block_size, len - first);
        for (int64_t j = 0; j < n; ++j) {
          const float* v = as_float(block + j * s_tok, head_dim, row.data());
          for (int64_t g = 0; g < groups; ++g) {
            const float p = scores[g * len + first + j];
            float* a = acc.data() + g * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
          }
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
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t d = q.size(2);
  if (d == 64) {
    bf16 ? decode_kernel<c10::BFloat16, 64>(out, q, kv, block_tables, context_lens, scale)
         : decode_kernel<float, 64>(out, q, kv, block_tables, context_lens, scale);
  } else if (d == 128) {
    bf16 ? decode_kernel<c10::BFloat16, 128>(out, q, kv, block_tables, context_lens, scale)
         : decode_kernel<float, 128>(out, q, kv, block_tables, context_lens, scale);
  } else {
    bf16 ? decode_kernel<c10::BFloat16, 0>(out, q, kv, block_tables, context_lens, scale)
         : decode_kernel<float, 0>(out, q, kv, block_tables, context_lens, scale);
  }
}

}  // namespace

TORCH_LIBRARY(scalellm_cpu, m) {
  m.def("paged_decode(Tensor(a!) out, Tensor q, Tensor kv, Tensor block_tables, Tensor context_lens, float scale) -> ()");
  m.impl("paged_decode", c10::DispatchKey::CPU, paged_decode);
}
