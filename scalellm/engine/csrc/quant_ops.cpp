// The two elementwise halves of an int8 x int8 matmul with dynamic per-token activation scales
// (CPU), each one pass over a row instead of ~10 torch ops:
//
//   quantize_rows_s8:  s[t] = max_i |x[t, i]| / 127  (1 for a row of zeros)
//                      q[t, i] = round_half_even(x[t, i] / s[t])            int8 in [-127, 127]
//   scale_int32:       out[t, o] = acc[t, o] * s[t] * w_scale[o] (+ bias[o])  rounded once to out's dtype
//
// Between them torch._int_mm(q, W_q^T) computes acc exactly in int32 (|q| <= 127, so a row of K
// products stays far inside int32 for any K below 2^17).
//
//   w8a8_linear:       both halves and the int8 x int8 product in one call, over a weight packed
//                      once at load (pack_w8a8 in models/quant_linear.py) as [N/16, K/2, 16, 2]:
//                      16 output channels side by side, two consecutive k of each. With AVX2 a
//                      16-byte load widened to int16 (vpmovsxbw) holds the (k, k+1) pairs of 8
//                      channels and vpmaddwd against a broadcast (x[t, k], x[t, k+1]) pair adds
//                      both products into 8 int32 lanes: exact (no int16 saturation, unlike
//                      u8 x s8 vpmaddubsw, which oneDNN and fbgemm use without VNNI), and the
//                      weight is read from L1 once per tile of up to 6 rows. torch._int_mm has
//                      no fast CPU path without AVX512-VNNI (a scalar loop). The activations
//                      take a scale per row and group of 64 channels (an outlier channel then
//                      coarsens only its group): each group's dot product exact in int32, the
//                      groups summed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec512.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowsPerTask = 4;

template <typename T>
float row_amax(const T* x, int64_t n) {
  float amax = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(x + i)));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < n; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
  return amax;
}

template <typename T>
void quantize_row(int8_t* q, float* scale, const T* x, int64_t n) {
  const float amax = row_amax(x, n);
  const float s = amax > 0.f ? amax / 127.f : 1.f;
  *scale = s;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (; i + 16 <= n; i += 16) {  // cvtps rounds to nearest even, as nearbyint does
    __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(load16(x + i), vs));
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
  }
#endif
  for (; i < n; ++i) {
    const float v = std::nearbyint(static_cast<float>(x[i]) / s);
    q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
}

template <typename T, typename W>
void scale_row(T* out, const int32_t* acc, float row_scale, const W* w_scale, const W* bias, int64_t n) {
  for (int64_t o = 0; o < n; ++o) {
    float v = static_cast<float>(acc[o]) * row_scale * static_cast<float>(w_scale[o]);
    if (bias != nullptr) v += static_cast<float>(bias[o]);
    out[o] = static_cast<T>(v);
  }
}

// f(scalar) with a value of t's element type, float32 or bfloat16
template <typename F>
void dispatch(const at::Tensor& t, F&& f) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  t.scalar_type() == at::kBFloat16 ? f(c10::BFloat16{}) : f(float{});
}

void quantize_rows_s8(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x [T, K] with contiguous rows");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.sizes() == x.sizes(), "q int8 like x");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == x.size(0),
              "scales float32 [T]");
  const int64_t n = x.size(1);
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        quantize_row(q.data_ptr<int8_t>() + t * n, scales.data_ptr<float>() + t,
                     x.data_ptr<scalar_t>() + t * x.stride(0), n);
    });
  });
}

void scale_int32(const at::Tensor& out, const at::Tensor& acc, const at::Tensor& row_scales,
                 const at::Tensor& w_scales, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(acc.scalar_type() == at::kInt && acc.dim() == 2 && acc.is_contiguous(), "acc int32 [T, N]");
  TORCH_CHECK(out.sizes() == acc.sizes() && out.is_contiguous(), "out [T, N] contiguous");
  TORCH_CHECK(row_scales.scalar_type() == at::kFloat && row_scales.numel() == acc.size(0), "row scales [T]");
  const int64_t n = acc.size(1);
  TORCH_CHECK(w_scales.is_contiguous() && w_scales.numel() == n, "weight scales [N]");
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == w_scales.scalar_type(),
                        "bias [N], the scales' dtype");
  dispatch(out, [&](auto out_tag) {
    using out_t = decltype(out_tag);
    dispatch(w_scales, [&](auto w_tag) {
      using w_t = decltype(w_tag);
      const w_t* b = bias ? bias->data_ptr<w_t>() : nullptr;
      at::parallel_for(0, acc.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          scale_row(out.data_ptr<out_t>() + t * n, acc.data_ptr<int32_t>() + t * n,
                    row_scales.data_ptr<float>()[t], w_scales.data_ptr<w_t>(), b, n);
      });
    });
  });
}


// ---- w8a8_linear ----------------------------------------------------------------------------

constexpr int64_t kBlockN = 16;  // output channels per packed block
constexpr int64_t kMaxRows = 6;  // rows per register tile: 6 x 2 int32 accumulators + 2 weights + 1
constexpr int64_t kGroup = 64;   // input channels per activation scale (kGroup / 2 pairs)

// (x[t, 2j], x[t, 2j + 1]) as two int16 in one int32 (little end first), j < K/2 (K padded to even)
void pair_row(int32_t* pairs, const int8_t* q, int64_t k) {
  for (int64_t j = 0; 2 * j < k; ++j) {
    const int16_t lo = q[2 * j], hi = 2 * j + 1 < k ? q[2 * j + 1] : 0;
    pairs[j] = static_cast<int32_t>(static_cast<uint16_t>(lo) |
                                    (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16));
  }
}

// acc[r][c] = sum over groups g of a[r, g] * (sum_{k in g} xq[r, k] w[c, k]) for R rows and the
// 16 channels of one packed block: the group's dot product exact in int32, then scaled in float.
template <int R>
void block_dot(float (*acc)[kBlockN], const int32_t* pairs, int64_t pairs_stride, const float* a, int64_t groups,
               const int8_t* w, int64_t k2) {
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < kBlockN; ++c) acc[r][c] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t j0 = g * (kGroup / 2), j1 = std::min(k2, j0 + kGroup / 2);
#if defined(__AVX2__)
    __m256i lo[R], hi[R];
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int64_t j = j0; j < j1; ++j) {
      const int8_t* wj = w + j * 2 * kBlockN;
      const __m256i w_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wj)));
      const __m256i w_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wj + kBlockN)));
      for (int r = 0; r < R; ++r) {
        const __m256i xr = _mm256_set1_epi32(pairs[r * pairs_stride + j]);
        lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(w_lo, xr));
        hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(w_hi, xr));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_set1_ps(a[r * groups + g]);
      _mm256_storeu_ps(acc[r], _mm256_add_ps(_mm256_loadu_ps(acc[r]), _mm256_mul_ps(_mm256_cvtepi32_ps(lo[r]), ar)));
      _mm256_storeu_ps(acc[r] + 8,
                       _mm256_add_ps(_mm256_loadu_ps(acc[r] + 8), _mm256_mul_ps(_mm256_cvtepi32_ps(hi[r]), ar)));
    }
#else
    for (int r = 0; r < R; ++r) {
      int32_t dot[kBlockN] = {};
      for (int64_t j = j0; j < j1; ++j) {
        const int8_t* wj = w + j * 2 * kBlockN;
        const int32_t p = pairs[r * pairs_stride + j];
        const int32_t x0 = static_cast<int16_t>(p & 0xFFFF), x1 = static_cast<int16_t>(p >> 16);
        for (int64_t c = 0; c < kBlockN; ++c) dot[c] += x0 * wj[2 * c] + x1 * wj[2 * c + 1];
      }
      for (int64_t c = 0; c < kBlockN; ++c) acc[r][c] += static_cast<float>(dot[c]) * a[r * groups + g];
    }
#endif
  }
}

template <int R>
void block_dot_dispatch(int rows, float (*acc)[kBlockN], const int32_t* pairs, int64_t stride, const float* a,
                        int64_t groups, const int8_t* w, int64_t k2) {
  if constexpr (R > 1) {
    if (rows < R) return block_dot_dispatch<R - 1>(rows, acc, pairs, stride, a, groups, w, k2);
  }
  block_dot<R>(acc, pairs, stride, a, groups, w, k2);
}

// out [T, N] = (x quantized per row and group of kGroup channels) @ (packed weight)^T, times the
// weight's scales, plus bias
void w8a8_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scales,
                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x [T, K] with contiguous rows");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.is_contiguous() &&
                  packed.size(2) == kBlockN && packed.size(3) == 2,
              "packed int8 [N/16, K/2, 16, 2]");
  const int64_t rows = x.size(0), k = x.size(1), k2 = packed.size(1), n = out.size(1);
  const int64_t groups = (k + kGroup - 1) / kGroup;
  TORCH_CHECK(k2 == (k + 1) / 2 && packed.size(0) == (n + kBlockN - 1) / kBlockN, "packed weight's shape vs x, out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.is_contiguous() && out.scalar_type() == x.scalar_type(),
              "out [T, N] contiguous, x's dtype");
  TORCH_CHECK(w_scales.is_contiguous() && w_scales.numel() == n, "weight scales [N]");
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == w_scales.scalar_type(),
                        "bias [N], the scales' dtype");
  at::Tensor xq = at::empty({rows, k}, x.options().dtype(at::kChar));
  at::Tensor pairs = at::empty({rows, k2}, x.options().dtype(at::kInt));
  at::Tensor act_scales = at::empty({rows, groups}, x.options().dtype(at::kFloat));
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* xt = x.data_ptr<scalar_t>() + t * x.stride(0);
        int8_t* qt = xq.data_ptr<int8_t>() + t * k;
        float* at = act_scales.data_ptr<float>() + t * groups;
        for (int64_t g = 0; g < groups; ++g)
          quantize_row(qt + g * kGroup, at + g, xt + g * kGroup, std::min(kGroup, k - g * kGroup));
        pair_row(pairs.data_ptr<int32_t>() + t * k2, qt, k);
      }
    });
  });
  const int64_t blocks = packed.size(0);
  dispatch(out, [&](auto out_tag) {
    using out_t = decltype(out_tag);
    dispatch(w_scales, [&](auto w_tag) {
      using w_t = decltype(w_tag);
      const w_t* ws = w_scales.data_ptr<w_t>();
      const w_t* b = bias ? bias->data_ptr<w_t>() : nullptr;
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        float acc[kMaxRows][kBlockN];
        for (int64_t nb = begin; nb < end; ++nb) {
          const int8_t* w = packed.data_ptr<int8_t>() + nb * k2 * 2 * kBlockN;
          const int64_t c0 = nb * kBlockN, cols = std::min(kBlockN, n - c0);
          for (int64_t t0 = 0; t0 < rows; t0 += kMaxRows) {
            const int tile = static_cast<int>(std::min(kMaxRows, rows - t0));
            block_dot_dispatch<kMaxRows>(tile, acc, pairs.data_ptr<int32_t>() + t0 * k2, k2,
                                         act_scales.data_ptr<float>() + t0 * groups, groups, w, k2);
            for (int r = 0; r < tile; ++r) {
              out_t* o = out.data_ptr<out_t>() + (t0 + r) * n + c0;
              for (int64_t c = 0; c < cols; ++c) {
                float v = acc[r][c] * static_cast<float>(ws[c0 + c]);
                if (b != nullptr) v += static_cast<float>(b[c0 + c]);
                o[c] = static_cast<out_t>(v);
              }
            }
          }
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("quantize_rows_s8(Tensor(a!) q, Tensor(b!) scales, Tensor x) -> ()");
  m.def("scale_int32(Tensor(a!) out, Tensor acc, Tensor row_scales, Tensor w_scales, Tensor? bias) -> ()");
  m.impl("quantize_rows_s8", c10::DispatchKey::CPU, quantize_rows_s8);
  m.impl("scale_int32", c10::DispatchKey::CPU, scale_int32);
  m.def("w8a8_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor w_scales, Tensor? bias) -> ()");
  m.impl("w8a8_linear", c10::DispatchKey::CPU, w8a8_linear);
}
