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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

at::Tensor pack_panels(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w [N, K] contiguous");
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor packed = at::zeros({P, K, NR}, w.options());
  if (w.scalar_type() == at::kBFloat16)
    pack_typed<uint16_t>(w, packed);
  else if (w.scalar_type() == at::kFloat)
    pack_typed<float>(w, packed);
  else
    TORCH_CHECK(false, "pack_panels: bfloat16 or float32 weights");
  return packed;
}

// out = x @ w^T (+ bias) with w packed by pack_panels; T: bfloat16 (W its bits) or float
template <typename T, typename W>
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
  T* out_ptr = reinterpret_cast<T*>(out.data_ptr());
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
              out_ptr[(m0 + m) * N + n0 + j] = T(s);
            }
        }
      }
    }
  });
}

void linear_panels(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && out.dim() == 2, "x [M, K], packed [P, K, 16], out [M, N]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && packed.scalar_type() == dtype &&
                  out.scalar_type() == dtype, "x, packed and out: all bfloat16 or all float32");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && packed.size(2) == NR && P == (N + NR - 1) / NR && out.size(0) == M,
              "shapes do not match");
  TORCH_CHECK(x.stride(1) == 1 && packed.is_contiguous() && out.is_contiguous(), "rows must be contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == N, "bias [N] in x's dtype");
  if (M == 0 || N == 0) return;
  if (dtype == at::kBFloat16)
    linear_typed<c10::BFloat16, uint16_t>(out, x, packed, bias);
  else
    linear_typed<float, float>(out, x, packed, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("pack_panels(Tensor w) -> Tensor");
  m.impl("pack_panels", c10::DispatchKey::CPU, pack_panels);
  m.def("linear_panels(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.impl("linear_panels", c10::DispatchKey::CPU, linear_panels);
}
