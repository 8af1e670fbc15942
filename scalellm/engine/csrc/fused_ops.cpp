// Fused elementwise ops of a decoder layer (CPU): one pass over a row instead of one torch op
// (and its dispatch, and its temporary) per arithmetic step. Every row is computed in float32
// and rounded once to the tensor's dtype (float32 or bfloat16).
//
//   rms_norm:  residual += x (if given, rounded to the dtype); out = w * (r * rsqrt(mean(r^2) + eps))
//              with r the residual (or x): transformers' order of the two products
//   silu_mul:  out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i]          (out [T, I])
//   rope_:     x[t, h, :] = x * cos[t] + [x2, x1] * sin[t]   in place; sin carries rotate_half's sign
//              (see models/llama.py); products, then their sum, each rounded as torch's ops do
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "vec256.h"
#include "vec512.h"

namespace scalellm {
namespace {

constexpr int64_t kRowsPerTask = 16;

template <typename T>
inline float f32(T x) {
  return static_cast<float>(x);
}

template <typename T>
void rms_norm_row(T* out, const T* x, T* residual, const T* w, int64_t n, float eps) {
  const T* src = x;
  int64_t i = 0;
  if (residual != nullptr) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) store16(residual + i, _mm512_add_ps(load16(residual + i), load16(x + i)));
#endif
    for (; i < n; ++i) residual[i] = static_cast<T>(f32(residual[i]) + f32(x[i]));
    src = residual;
  }
  float sum = 0.f;
  i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = load16(src + i);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += f32(src[i]) * f32(src[i]);
  // in double: -ffast-math would turn a float 1 / sqrt into an approximate rsqrt
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sum / n + eps)));
  i = 0;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(scale);
  for (; i + 16 <= n; i += 16) store16(out + i, _mm512_mul_ps(load16(w + i), _mm512_mul_ps(load16(src + i), s)));
#endif
  for (; i < n; ++i) out[i] = static_cast<T>(f32(w[i]) * (f32(src[i]) * scale));
}

template <typename T>
void silu_mul_row(T* out, const T* gate, const T* up, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = load16(gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store16(out + i, _mm512_mul_ps(silu, load16(up + i)));
  }
#elif defined(SCALELLM_AVX2)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = load8(gate + i);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    store8(out + i, _mm256_mul_ps(silu, load8(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float g = f32(gate[i]);
    out[i] = static_cast<T>(g / (1.f + std::exp(-g)) * f32(up[i]));
  }
}

template <typename T>
void rope_row(T* x, const T* cos, const T* sin, int64_t d) {
  const int64_t half = d / 2;
  int64_t i = 0;
#if defined(__AVX512F__)
  if (half % 16 == 0) {
    for (; i < half; i += 16) {  // both halves at once: x1' = x1 c1 + x2 s1, x2' = x2 c2 + x1 s2
      const __m512 x1 = load16(x + i), x2 = load16(x + half + i);
      store16(x + i, _mm512_add_ps(_mm512_mul_ps(x1, load16(cos + i)), _mm512_mul_ps(x2, load16(sin + i))));
      store16(x + half + i, _mm512_add_ps(_mm512_mul_ps(x2, load16(cos + half + i)),
                                          _mm512_mul_ps(x1, load16(sin + half + i))));
    }
  }
#endif
  for (; i < half; ++i) {
    const float x1 = f32(x[i]), x2 = f32(x[half + i]);
    x[i] = static_cast<T>(x1 * f32(cos[i]) + x2 * f32(sin[i]));
    x[half + i] = static_cast<T>(x2 * f32(cos[half + i]) + x1 * f32(sin[half + i]));
  }
}

// f(scalar) with a value of x's element type, float32 or bfloat16
template <typename F>
void dispatch(const at::Tensor& x, F&& f) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  x.scalar_type() == at::kBFloat16 ? f(c10::BFloat16{}) : f(float{});
}

}  // namespace

void rms_norm(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& residual,
              const at::Tensor& weight, double eps) {
  const int64_t n = weight.numel();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n && x.stride(1) == 1 && out.stride(1) == 1, "rows [T, n]");
  TORCH_CHECK(out.sizes() == x.sizes() && weight.is_contiguous(), "out like x, contiguous weight");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(), "one dtype");
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1, "residual like x");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "one dtype");
  }
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* res = residual ? residual->data_ptr<scalar_t>() : nullptr;
    const int64_t rs = residual ? residual->stride(0) : 0;
    at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        rms_norm_row(out.data_ptr<scalar_t>() + t * out.stride(0), x.data_ptr<scalar_t>() + t * x.stride(0),
                     res == nullptr ? res : res + t * rs, weight.data_ptr<scalar_t>(), n, static_cast<float>(eps));
    });
  });
}

void silu_mul(const at::Tensor& out, const at::Tensor& gate_up) {
  const int64_t n = out.size(1);
  TORCH_CHECK(gate_up.dim() == 2 && out.dim() == 2 && gate_up.size(1) == 2 * n, "gate_up [T, 2I], out [T, I]");
  TORCH_CHECK(gate_up.stride(1) == 1 && out.stride(1) == 1 && out.size(0) == gate_up.size(0), "rows");
  TORCH_CHECK(out.scalar_type() == gate_up.scalar_type(), "one dtype");
  dispatch(out, [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, out.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = gate_up.data_ptr<scalar_t>() + t * gate_up.stride(0);
        silu_mul_row(out.data_ptr<scalar_t>() + t * out.stride(0), row, row + n, n);
      }
    });
  });
}

void rope_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "x [T, H, D], D even and contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == x.size(0) * x.size(2) &&
                  sin.numel() == cos.numel(), "cos, sin [T, D] contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "one dtype");
  const int64_t heads = x.size(1), d = x.size(2);
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads; ++h)
          rope_row(x.data_ptr<scalar_t>() + t * x.stride(0) + h * x.stride(1), cos.data_ptr<scalar_t>() + t * d,
                   sin.data_ptr<scalar_t>() + t * d, d);
    });
  });
}

}  // namespace scalellm

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor(b!)? residual, Tensor weight, float eps) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, scalellm::rms_norm);
  m.impl("silu_mul", c10::DispatchKey::CPU, scalellm::silu_mul);
  m.impl("rope_", c10::DispatchKey::CPU, scalellm::rope_);
}
