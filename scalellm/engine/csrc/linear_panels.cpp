// Linear layers over weights packed once in panels (models/packed_linear.PanelLinear).
//
// bfloat16 on CPUs without bfloat16 arithmetic (no AVX512-BF16, no AMX): there torch's bfloat16
// matmul takes its generic path (oneDNN's bfloat16 kernels need AVX-512), and oneDNN cannot be
// given the weights as they are. This kernel keeps the weights in bfloat16 (half the bytes of
// float32 to stream per step) and widens them in registers; products and sums in float32, one
// rounding of each output to bfloat16 (bias added before it), as a bfloat16 GEMM with float32
// accumulation does. On AVX2 CPUs it runs every row count (0.38-1.05x oneDNN's float32 time from
// 1 to 1024 rows, the demo model's shapes, the 2-core AVX2 EPYC); on AVX-512 ones PanelLinear
// hands many rows to oneDNN in float32. float32 on AVX2 CPUs without AVX-512, at every row
// count: the same panels took 0.71-0.91x oneDNN's time from 1 to 1024 rows (one row streams 32.6
// against 23.8 GB/s, docs/benchmarks.md).
//
//   out[m, n] = T( sum_k x[m, k] * w[n, k] + bias[n] )      x [M, K], w [N, K] (nn.Linear's), T x's dtype
//
// The weight is packed once (pack_panels) into panels of NR = 16 output columns, k-major, so one
// load of 32 (bfloat16) or 64 bytes is the 16 weights of a k for a panel, as two 8-lane vectors:
//
//   packed [P = ceil(N / 16), K, 16]       packed[p, k, slot(c)] = w[16 p + c, k]  (0 past N)
//
// slot(c) = c for float32; bfloat16 interleaves, so a shift and a mask widen the 16 in place:
//
//   32-bit lane j of a bfloat16 k-row:   [ high half: column 8 + j | low half: column j ]
//
// A micro-kernel multiplies MR <= 6 rows of x by a panel as outer products, one k at a time:
// each x[m, k] broadcast, two multiply-adds into the MR x 16 accumulators (12 of the 16 AVX2
// registers at MR = 6), so a weight widened once serves MR rows. Each output is a sum over k in
// order, whatever MR: a row's output does not depend on the rows beside it, and the bfloat16
// result is the float32 kernel's over the widened weights, rounded. Work is split over panels;
// rows of x go past a task's panels in chunks of MC rows that stay in L2 (a decode step's x is
// one chunk; a prefill's is many).
//
// AVX-512 CPUs (float32), and AVX512-BF16 ones (bfloat16), take the 16 columns of a panel in one
// 16-lane register, and a micro-kernel of R <= 6 rows by Q <= 4 panels (24 accumulators of the
// 32 registers). float32 keeps the layout above (slot(c) = c); bfloat16 stores a panel's k in
// pairs, as vdpbf16ps multiplies them (one instruction: two k for 16 columns, summed in float32):
//
//   packed [P, ceil(K / 2), 16, 2]        packed[p, k / 2, c, k % 2] = w[16 p + c, k]  (0 past N, K)
//
// A task's panels are read in address order, four long streams at a time; one row of x at a
// time (a decode at one stream) runs at the memory's rate, 1.5-2x oneDNN's bfloat16 and float32
// on the 2-core Zen 4 (whose GEMV paths cost ~15 us a call and stream at ~19 GB/s), and level
// with it from 64 to 1024 rows (docs/benchmarks.md). Each output is still a sum over k
// (bfloat16: over k pairs) in order, whatever the rows beside it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// the 16-lane kernels: float32 on AVX-512 (masked stores need AVX512BW's 16-bit forms for
// bfloat16), bfloat16 where vdpbf16ps exists
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SCALELLM_PANELS_512 1
#endif
#if defined(SCALELLM_PANELS_512) && defined(__AVX512BF16__)
#define SCALELLM_PANELS_BF16 1
#endif

namespace scalellm {
namespace {

constexpr int64_t NR = 16;  // output columns per panel
constexpr int64_t MR = 6;  // rows of x per micro-kernel call
constexpr int64_t MC = 48;  // rows of x per chunk (a prefill's thousands would not stay in cache)

inline float widen(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float widen(float f) { return f; }

// Where a panel keeps output column j (0..15) of a k: float32 in order; bfloat16 interleaved,
// columns 0-7 in the even slots and 8-15 in the odd ones (load_row widens them in place).
template <typename W>
constexpr int64_t slot(int64_t j) {
  if constexpr (std::is_same_v<W, float>) return j;
  return j < 8 ? 2 * j : 2 * (j - 8) + 1;
}

#if defined(__AVX2__) && defined(__FMA__)
// The 16 weights of one k of a panel as two 8-lane float32 vectors (bfloat16: the shift widens
// columns 0-7, the mask 8-15, as slot stores them).
inline void load_row(const uint16_t* w, __m256& w0, __m256& w1) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  w0 = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  w1 = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void load_row(const float* w, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(w);
  w1 = _mm256_loadu_ps(w + 8);
}

// c[m * NR + j] = sum_k x[m, k] * panel[k, j] for R rows of x. The accumulators are named
// variables, not an array: GCC 12 kept an __m256 array in memory for the bfloat16 case at R = 6
// (a store of every accumulator each k, half the speed), though 15 of the 16 registers suffice;
// inlined into its caller it still spilled two, so it is kept out of line (a call per K loop).
template <int64_t R, typename W>
__attribute__((noinline)) void micro(const float* x, int64_t K, const W* panel, float* c) {
  static_assert(R >= 1 && R <= 6, "up to 6 rows");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t k = 0; k < K; ++k) {
    __m256 w0, w1;
    load_row(panel + k * NR, w0, w1);
    // keep the weights in registers: at R <= 4 GCC folds them into each multiply-add as a memory
    // operand, two loads of a panel row per x row, and the loads, not the multiply-adds, set the pace
    asm("" : "+x"(w0), "+x"(w1));
#define SCALELLM_PANEL_ROW(m)                                  \
  if constexpr (R > m) {                                       \
    const __m256 xv = _mm256_broadcast_ss(x + m * K + k);      \
    a##m##0 = _mm256_fmadd_ps(xv, w0, a##m##0);                \
    a##m##1 = _mm256_fmadd_ps(xv, w1, a##m##1);                \
  }
    SCALELLM_PANEL_ROW(0) SCALELLM_PANEL_ROW(1) SCALELLM_PANEL_ROW(2)
    SCALELLM_PANEL_ROW(3) SCALELLM_PANEL_ROW(4) SCALELLM_PANEL_ROW(5)
#undef SCALELLM_PANEL_ROW
  }
#define SCALELLM_PANEL_STORE(m)                 \
  if constexpr (R > m) {                        \
    _mm256_storeu_ps(c + m * NR, a##m##0);      \
    _mm256_storeu_ps(c + m * NR + 8, a##m##1);  \
  }
  SCALELLM_PANEL_STORE(0) SCALELLM_PANEL_STORE(1) SCALELLM_PANEL_STORE(2)
  SCALELLM_PANEL_STORE(3) SCALELLM_PANEL_STORE(4) SCALELLM_PANEL_STORE(5)
#undef SCALELLM_PANEL_STORE
}
#else
template <int64_t R, typename W>
inline void micro(const float* x, int64_t K, const W* panel, float* c) {
  for (int64_t m = 0; m < R; ++m)
    for (int64_t j = 0; j < NR; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * widen(panel[k * NR + slot<W>(j)]);
      c[m * NR + j] = s;
    }
}
#endif

template <typename W>
inline void micro_rows(int64_t rows, const float* x, int64_t K, const W* panel, float* c) {
  switch (rows) {
    case 6: micro<6, W>(x, K, panel, c); break;
    case 5: micro<5, W>(x, K, panel, c); break;
    case 4: micro<4, W>(x, K, panel, c); break;
    case 3: micro<3, W>(x, K, panel, c); break;
    case 2: micro<2, W>(x, K, panel, c); break;
    default: micro<1, W>(x, K, panel, c);
  }
}

#if defined(SCALELLM_PANELS_512)
// One k step of a panel for the 16-lane micro-kernel: the weights (16 columns), x broadcast,
// and the multiply-add. float32: one k; bfloat16: a k pair (x's two values as one 32-bit lane).
struct Step32 {
  using W = float;
  static constexpr int64_t kPerStep = 1;
  static __m512 weights(const float* panel, int64_t s) { return _mm512_loadu_ps(panel + s * NR); }
  static __m512 x(const float* row, int64_t s) { return _mm512_set1_ps(row[s]); }
  static __m512 mac(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
};
#if defined(SCALELLM_PANELS_BF16)
struct StepBf16 {
  using W = uint16_t;
  static constexpr int64_t kPerStep = 2;
  static __m512bh weights(const uint16_t* panel, int64_t s) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + s * 2 * NR));
  }
  static __m512bh x(const uint16_t* row, int64_t s) {
    int32_t pair;
    std::memcpy(&pair, row + 2 * s, sizeof(pair));
    return reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
  }
  static __m512 mac(__m512 acc, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }
};
#endif

// c[(r * Q + q) * 16 + j] = sum over the steps of x[r] times panel q's column j, for R rows of x
// (ldx apart) and Q panels (pstride apart). Named accumulators: GCC keeps an array of them in
// memory (see micro above).
template <typename S, int R, int Q>
__attribute__((noinline)) void micro512(const typename S::W* x, int64_t ldx, int64_t steps,
                                        const typename S::W* panel, int64_t pstride, float* c) {
  static_assert(R >= 1 && R <= 6 && Q >= 1 && Q <= 4, "up to 6 rows by 4 panels");
  const __m512 zero = _mm512_setzero_ps();
  __m512 a00 = zero, a01 = zero, a02 = zero, a03 = zero, a10 = zero, a11 = zero, a12 = zero, a13 = zero;
  __m512 a20 = zero, a21 = zero, a22 = zero, a23 = zero, a30 = zero, a31 = zero, a32 = zero, a33 = zero;
  __m512 a40 = zero, a41 = zero, a42 = zero, a43 = zero, a50 = zero, a51 = zero, a52 = zero, a53 = zero;
  for (int64_t s = 0; s < steps; ++s) {
    const auto w0 = S::weights(panel, s);
    decltype(w0) w1 = Q > 1 ? S::weights(panel + pstride, s) : w0;
    decltype(w0) w2 = Q > 2 ? S::weights(panel + 2 * pstride, s) : w0;
    decltype(w0) w3 = Q > 3 ? S::weights(panel + 3 * pstride, s) : w0;
#define SCALELLM_PANEL512_ROW(r)                                \
  if constexpr (R > r) {                                        \
    const auto xr = S::x(x + r * ldx, s);                       \
    a##r##0 = S::mac(a##r##0, w0, xr);                          \
    if constexpr (Q > 1) a##r##1 = S::mac(a##r##1, w1, xr);     \
    if constexpr (Q > 2) a##r##2 = S::mac(a##r##2, w2, xr);     \
    if constexpr (Q > 3) a##r##3 = S::mac(a##r##3, w3, xr);     \
  }
    SCALELLM_PANEL512_ROW(0) SCALELLM_PANEL512_ROW(1) SCALELLM_PANEL512_ROW(2)
    SCALELLM_PANEL512_ROW(3) SCALELLM_PANEL512_ROW(4) SCALELLM_PANEL512_ROW(5)
#undef SCALELLM_PANEL512_ROW
  }
#define SCALELLM_PANEL512_STORE(r)                                                \
  if constexpr (R > r) {                                                          \
    _mm512_storeu_ps(c + (r * Q) * NR, a##r##0);                                  \
    if constexpr (Q > 1) _mm512_storeu_ps(c + (r * Q + 1) * NR, a##r##1);         \
    if constexpr (Q > 2) _mm512_storeu_ps(c + (r * Q + 2) * NR, a##r##2);         \
    if constexpr (Q > 3) _mm512_storeu_ps(c + (r * Q + 3) * NR, a##r##3);         \
  }
  SCALELLM_PANEL512_STORE(0) SCALELLM_PANEL512_STORE(1) SCALELLM_PANEL512_STORE(2)
  SCALELLM_PANEL512_STORE(3) SCALELLM_PANEL512_STORE(4) SCALELLM_PANEL512_STORE(5)
#undef SCALELLM_PANEL512_STORE
}

template <typename S, int Q>
void micro512_rows(int64_t rows, const typename S::W* x, int64_t ldx, int64_t steps,
                   const typename S::W* panel, int64_t pstride, float* c) {
  switch (rows) {
    case 6: micro512<S, 6, Q>(x, ldx, steps, panel, pstride, c); break;
    case 5: micro512<S, 5, Q>(x, ldx, steps, panel, pstride, c); break;
    case 4: micro512<S, 4, Q>(x, ldx, steps, panel, pstride, c); break;
    case 3: micro512<S, 3, Q>(x, ldx, steps, panel, pstride, c); break;
    case 2: micro512<S, 2, Q>(x, ldx, steps, panel, pstride, c); break;
    default: micro512<S, 1, Q>(x, ldx, steps, panel, pstride, c);
  }
}

template <typename S>
void micro512_block(int64_t rows, int64_t panels, const typename S::W* x, int64_t ldx, int64_t steps,
                    const typename S::W* panel, int64_t pstride, float* c) {
  switch (panels) {
    case 4: micro512_rows<S, 4>(rows, x, ldx, steps, panel, pstride, c); break;
    case 3: micro512_rows<S, 3>(rows, x, ldx, steps, panel, pstride, c); break;
    case 2: micro512_rows<S, 2>(rows, x, ldx, steps, panel, pstride, c); break;
    default: micro512_rows<S, 1>(rows, x, ldx, steps, panel, pstride, c);
  }
}

inline __m512 load_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_masked(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store_masked(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
#if defined(SCALELLM_PANELS_BF16)
inline void store_masked(c10::BFloat16* p, __m512 v, __mmask16 m) {  // round to nearest even
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#endif

// out = x @ w^T (+ bias) through micro512: T float (S = Step32) or bfloat16 (S = StepBf16); O the
// output's type (T, or float for the unrounded sums). x's rows are read where they are (ldx
// apart); a bfloat16 x with K odd is copied with a zero after each row, the pad its last pair reads.
template <typename T, typename S, typename O = T>
void linear512(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
               const std::optional<at::Tensor>& bias) {
  using W = typename S::W;
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = packed.size(0);
  const int64_t steps = packed.size(1), pstride = steps * S::kPerStep * NR;
  const W* xs = reinterpret_cast<const W*>(x.data_ptr());
  int64_t ldx = x.stride(0);
  std::vector<W> padded;
  if (steps * S::kPerStep != K) {
    const int64_t width = steps * S::kPerStep;
    padded.assign(M * width, W(0));
    for (int64_t m = 0; m < M; ++m) std::memcpy(&padded[m * width], xs + m * ldx, K * sizeof(W));
    xs = padded.data();
    ldx = width;
  }
  const W* w_ptr = reinterpret_cast<const W*>(packed.data_ptr());
  const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  O* out_ptr = reinterpret_cast<O*>(out.data_ptr());
  constexpr int64_t R = 6, Q = 4;
  // rows of x per chunk: as many as fill half of L2 beside the panels (at least 48)
  const int64_t chunk = std::max<int64_t>(48, (int64_t{1} << 19) / (ldx * static_cast<int64_t>(sizeof(W))) / R * R);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, pstride * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float c[R * Q * NR];
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
      const int64_t c1 = std::min(M, c0 + chunk);
      for (int64_t p0 = begin; p0 < end; p0 += Q) {
        const int64_t panels = std::min(Q, end - p0);
        __m512 b[Q];
        __mmask16 mask[Q];
        for (int64_t q = 0; q < panels; ++q) {
          const int64_t cols = std::min(NR, N - (p0 + q) * NR);
          mask[q] = static_cast<__mmask16>((1u << cols) - 1u);
          b[q] = bias_ptr != nullptr ? load_masked(bias_ptr + (p0 + q) * NR, mask[q]) : _mm512_setzero_ps();
        }
        for (int64_t m0 = c0; m0 < c1; m0 += R) {
          const int64_t rows = std::min(R, c1 - m0);
          micro512_block<S>(rows, panels, xs + m0 * ldx, ldx, steps, w_ptr + p0 * pstride, pstride, c);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t q = 0; q < panels; ++q) {
              const __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + (r * panels + q) * NR), b[q]);
              store_masked(out_ptr + (m0 + r) * N + (p0 + q) * NR, v, mask[q]);
            }
        }
      }
    }
  });
}
#endif  // SCALELLM_PANELS_512

// Which kernel a dtype's panels go through in this build: "avx512_bf16" / "avx512" (micro512),
// "avx2" (micro), "scalar".
std::string panels_isa(at::ScalarType dtype) {
#if defined(SCALELLM_PANELS_BF16)
  if (dtype == at::kBFloat16) return "avx512_bf16";
#endif
#if defined(SCALELLM_PANELS_512)
  if (dtype == at::kFloat) return "avx512";
#endif
#if defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

// bfloat16 panels stored in k pairs (for vdpbf16ps), else one k at a time
constexpr bool in_pairs(at::ScalarType dtype) {
#if defined(SCALELLM_PANELS_BF16)
  return dtype == at::kBFloat16;
#else
  static_cast<void>(dtype);  // no vdpbf16ps in this build
  return false;
#endif
}

template <typename W>
void pack_typed(const at::Tensor& w, const at::Tensor& packed) {
  const int64_t N = w.size(0), K = w.size(1), P = packed.size(0);
  const W* src = reinterpret_cast<const W*>(w.data_ptr());
  W* dst = reinterpret_cast<W*>(packed.data_ptr());
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t j = 0; j < NR && p * NR + j < N; ++j)
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * NR + slot<W>(j)] = src[(p * NR + j) * K + k];
  });
}

// bfloat16 in k pairs (the AVX512-BF16 kernel's layout, the header's second picture)
void pack_pairs(const at::Tensor& w, const at::Tensor& packed) {
  const int64_t N = w.size(0), K = w.size(1), P = packed.size(0), steps = packed.size(1);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t j = 0; j < NR && p * NR + j < N; ++j)
        for (int64_t k = 0; k < K; ++k) dst[((p * steps + k / 2) * NR + j) * 2 + k % 2] = src[(p * NR + j) * K + k];
  });
}

at::Tensor pack_panels(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w [N, K] contiguous");
  const auto dtype = w.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "pack_panels: bfloat16 or float32 weights");
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  const bool pairs = in_pairs(dtype);
  at::Tensor packed = at::zeros({P, pairs ? (K + 1) / 2 : K, pairs ? 2 * NR : NR}, w.options());
  if (pairs)
    pack_pairs(w, packed);
  else if (dtype == at::kBFloat16)
    pack_typed<uint16_t>(w, packed);
  else
    pack_typed<float>(w, packed);
  return packed;
}

// out = x @ w^T (+ bias) with w packed by pack_panels; T: bfloat16 (W its bits) or float; O:
// the output's type, T or (a bfloat16 x) float: the sums unrounded
template <typename T, typename W, typename O = T>
void linear_typed(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                  const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = packed.size(0);
  const W* bias_ptr = bias.has_value() ? reinterpret_cast<const W*>(bias->data_ptr()) : nullptr;
  const W* x_ptr = reinterpret_cast<const W*>(x.data_ptr());
  std::vector<float> xf;  // bfloat16 x widened once, read by every panel; float32 x read as it is
  const float* xs = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (x.stride(0) == K) xs = x.data_ptr<float>();
  }
  if (xs == nullptr) {
    xf.resize(M * K);
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        for (int64_t k = 0; k < K; ++k) xf[m * K + k] = widen(x_ptr[m * x.stride(0) + k]);
    });
    xs = xf.data();
  }
  const W* w_ptr = reinterpret_cast<const W*>(packed.data_ptr());
  O* out_ptr = reinterpret_cast<O*>(out.data_ptr());
  // a task of at least ~64 KB of weights: fewer, larger tasks at one thread cost nothing
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K * NR * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    float c[MR * NR];
    for (int64_t c0 = 0; c0 < M; c0 += MC) {  // a chunk of x stays in L2 while the task's panels pass
      const int64_t c1 = std::min(M, c0 + MC);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * NR, cols = std::min(NR, N - n0);
        for (int64_t m0 = c0; m0 < c1; m0 += MR) {
          const int64_t rows = std::min(MR, c1 - m0);
          micro_rows(rows, xs + m0 * K, K, w_ptr + p * K * NR, c);
          for (int64_t m = 0; m < rows; ++m)
            for (int64_t j = 0; j < cols; ++j) {
              float s = c[m * NR + j];
              if (bias_ptr != nullptr) s += widen(bias_ptr[n0 + j]);
              out_ptr[(m0 + m) * N + n0 + j] = O(s);
            }
        }
      }
    }
  });
}

}  // namespace

void linear_panels(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && out.dim() == 2, "x [M, K], packed [P, K, 16], out [M, N]");
  const auto dtype = x.scalar_type();
  const bool wide = dtype == at::kBFloat16 && out.scalar_type() == at::kFloat;  // sums unrounded
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && packed.scalar_type() == dtype &&
                  (out.scalar_type() == dtype || wide),
              "x, packed and out: all bfloat16 or all float32 (or a float32 out for bfloat16)");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = packed.size(0);
  const bool pairs = in_pairs(dtype);
  TORCH_CHECK(packed.size(1) == (pairs ? (K + 1) / 2 : K) && packed.size(2) == (pairs ? 2 * NR : NR) &&
                  P == (N + NR - 1) / NR && out.size(0) == M,
              "shapes do not match (packed by pack_panels for this x's dtype?)");
  TORCH_CHECK(x.stride(1) == 1 && packed.is_contiguous() && out.is_contiguous(), "rows must be contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == N, "bias [N] in x's dtype");
  if (M == 0 || N == 0) return;
#if defined(SCALELLM_PANELS_512)
  if (dtype == at::kFloat) return linear512<float, Step32>(out, x, packed, bias);
#endif
#if defined(SCALELLM_PANELS_BF16)
  if (wide) return linear512<c10::BFloat16, StepBf16, float>(out, x, packed, bias);
  if (dtype == at::kBFloat16) return linear512<c10::BFloat16, StepBf16>(out, x, packed, bias);
#endif
  if (wide)
    linear_typed<c10::BFloat16, uint16_t, float>(out, x, packed, bias);
  else if (dtype == at::kBFloat16)
    linear_typed<c10::BFloat16, uint16_t>(out, x, packed, bias);
  else
    linear_typed<float, float>(out, x, packed, bias);
}

}  // namespace scalellm

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("pack_panels(Tensor w) -> Tensor");
  m.impl("pack_panels", c10::DispatchKey::CPU, scalellm::pack_panels);
  m.def("linear_panels(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.impl("linear_panels", c10::DispatchKey::CPU, scalellm::linear_panels);
  m.def("panels_isa(ScalarType dtype) -> str", scalellm::panels_isa);
}
