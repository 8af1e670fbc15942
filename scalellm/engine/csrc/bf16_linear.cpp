// Linear layers of a bfloat16 model on CPUs without bfloat16 arithmetic (no AVX512-BF16, no AMX).
//
// There torch's bfloat16 matmul takes its generic path (oneDNN's bfloat16 kernels need AVX-512),
// and oneDNN cannot be given the weights as they are. This kernel keeps the weights in bfloat16
// (half the bytes of float32 to stream per step, which is what a decode step at a few tokens is
// bound by) and widens them in registers; products and sums in float32, one rounding of each
// output to bfloat16 (bias added before it), as a bfloat16 GEMM with float32 accumulation does.
//
//   out[m, n] = bf16( sum_k x[m, k] * w[n, k] + bias[n] )      x [M, K], w [N, K] (nn.Linear's)
//
// Work is split over blocks of NB = 4 weight rows; each block is read once for MB = 2 rows of x
// at a time (8 accumulators in registers) and stays in L1 while the rows of x go past it, in
// chunks of MC rows that stay in L2 (a decode step's x is one chunk; a prefill's is many).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NB = 4;  // weight rows per block
constexpr int64_t MB = 2;  // rows of x per pass over a block
constexpr int64_t MC = 32;  // rows of x per chunk (a prefill's thousands would not stay in cache)

inline float widen(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const uint16_t* p) {  // 8 bfloat16 -> 8 float32 (bfloat16 is float32's upper half)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sums[m * NB + n] = x[m, :] . w[n, :] for R rows of x (R <= MB) and NB rows of w
template <int64_t R>
inline void tile(const float* x, int64_t K, const uint16_t* w, int64_t ldw, float* sums) {
  __m256 acc[R][NB];
  for (int64_t m = 0; m < R; ++m)
    for (int64_t n = 0; n < NB; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NB];
    for (int64_t n = 0; n < NB; ++n) wv[n] = load8(w + n * ldw + k);
    for (int64_t m = 0; m < R; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int64_t n = 0; n < NB; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int64_t m = 0; m < R; ++m)
    for (int64_t n = 0; n < NB; ++n) {
      float s = hsum8(acc[m][n]);
      for (int64_t j = k; j < K; ++j) s += x[m * K + j] * widen(w[n * ldw + j]);
      sums[m * NB + n] = s;
    }
}
#else
template <int64_t R>
inline void tile(const float* x, int64_t K, const uint16_t* w, int64_t ldw, float* sums) {
  for (int64_t m = 0; m < R; ++m)
    for (int64_t n = 0; n < NB; ++n) {
      float s = 0.f;
      for (int64_t j = 0; j < K; ++j) s += x[m * K + j] * widen(w[n * ldw + j]);
      sums[m * NB + n] = s;
    }
}
#endif

void linear_bf16(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "x [M, K], w [N, K], out [M, N]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(x.size(1) == w.size(1) && out.size(0) == x.size(0) && out.size(1) == w.size(0), "shapes do not match");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous() && out.is_contiguous(), "rows must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const uint16_t* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == N, "bias [N] bfloat16");
    bias_ptr = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  if (M == 0 || N == 0) return;
  const uint16_t* x_ptr = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<float> xf(M * K);  // x widened once, read by every block
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = widen(x_ptr[m * x.stride(0) + k]);
  const uint16_t* w_ptr = reinterpret_cast<const uint16_t*>(w.data_ptr());
  c10::BFloat16* out_ptr = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = (N + NB - 1) / NB;
  // a task of at least ~64 KB of weights: fewer, larger tasks at one thread cost nothing
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, K));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float sums[MB * NB];
    for (int64_t c0 = 0; c0 < M; c0 += MC) {  // a chunk of x stays in L2 while the task's rows of w pass
      const int64_t c1 = std::min(M, c0 + MC);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t n0 = blk * NB, nn = std::min(NB, N - n0);
        if (nn < NB) {  // the last rows when N is not a multiple of NB
          for (int64_t m = c0; m < c1; ++m)
            for (int64_t n = n0; n < N; ++n) {
              float s = 0.f;
              for (int64_t k = 0; k < K; ++k) s += xf[m * K + k] * widen(w_ptr[n * K + k]);
              if (bias_ptr != nullptr) s += widen(bias_ptr[n]);
              out_ptr[m * N + n] = c10::BFloat16(s);
            }
          continue;
        }
        for (int64_t m0 = c0; m0 < c1; m0 += MB) {
          const int64_t rows = std::min(MB, c1 - m0);
          if (rows == MB)
            tile<MB>(xf.data() + m0 * K, K, w_ptr + n0 * K, K, sums);
          else
            tile<1>(xf.data() + m0 * K, K, w_ptr + n0 * K, K, sums);
          for (int64_t m = 0; m < rows; ++m)
            for (int64_t n = 0; n < NB; ++n) {
              float s = sums[m * NB + n];
              if (bias_ptr != nullptr) s += widen(bias_ptr[n0 + n]);
              out_ptr[(m0 + m) * N + n0 + n] = c10::BFloat16(s);
            }
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("linear_bf16(Tensor(a!) out, Tensor x, Tensor w, Tensor? bias) -> ()");
  m.impl("linear_bf16", c10::DispatchKey::CPU, linear_bf16);
}
