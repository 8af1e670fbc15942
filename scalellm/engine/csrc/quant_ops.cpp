// The two elementwise halves of an int8 x int8 matmul with dynamic per-token activation scales
// (CPU), each one pass over a row instead of ~10 torch ops:
//
//   quantize_rows_s8:  s[t] = max_i |x[t, i]| / 127  (1 for a row of zeros)
//                      q[t, i] = round_half_even(x[t, i] / s[t])            int8 in [-127, 127]
//   scale_int32:       out[t, o] = acc[t, o] * s[t] * w_scale[o] (+ bias[o])  rounded once to out's dtype
//
// Between them torch._int_mm(q, W_q^T) computes acc exactly in int32 (|q| <= 127, so a row of K
// products stays far inside int32 for any K below 2^17).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec512.h"

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("quantize_rows_s8(Tensor(a!) q, Tensor(b!) scales, Tensor x) -> ()");
  m.def("scale_int32(Tensor(a!) out, Tensor acc, Tensor row_scales, Tensor w_scales, Tensor? bias) -> ()");
  m.impl("quantize_rows_s8", c10::DispatchKey::CPU, quantize_rows_s8);
  m.impl("scale_int32", c10::DispatchKey::CPU, scale_int32);
}
