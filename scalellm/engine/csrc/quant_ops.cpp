// w8a8_linear (CPU): out = x @ W^T for an int8 weight W packed once at load (pack_w8a8 in
// models/quant_linear.py) as [N/16, K/4, 16, 4]: 16 output channels side by side, four
// consecutive k of each (K padded to 4 with zeros), so 64 bytes are 16 channels x 4 k. One call
// quantizes the activations to int8 with a scale per row and group of 64 channels (an outlier
// channel then coarsens only its group), multiplies int8 x int8 and scales:
//
//   out[t, o] = (sum_g float(dot_g[t, o]) * a[t, g]) * w_scale[o] (+ bias[o])
//   dot_g[t, o] = sum_{i in g} xq[t, i] * q[o, i]          exact in int32
//
// the groups summed in order, one fma each, the same float32 operations on every path below, so
// all return the same bits (a row's result does not depend on the batch nor on the CPU's
// instruction set). Paths, the best the build (-march=native) has unless `path` names one:
//
//   - AMX (amx-int8, Linux granted the tile state): tiles of 16 rows. tdpbssd (signed x signed)
//     takes A = 16 rows x 64 int8 of xq (one group) and B = the group's [16 quads, 16, 4] slice
//     of the packed block, as laid out; the 16 x 16 int32 C tile is stored and added into the
//     float32 accumulators per group. Rows past the last 16, and K not a multiple of 64, go to:
//   - AVX512-VNNI: one zmm load is 16 channels x 4 k; vpdpbusd (unsigned x signed bytes) of the
//     weight xor 0x80 (w + 128) against the broadcast activation quad gives dot + 128 sum(xq),
//     and 128 sum_g(xq[t]) comes off per row and group; up to 12 rows per register tile.
//   - AVX2: a 16-byte load widened to int16 is 4 channels x 4 k; vpmaddwd against the broadcast
//     int16 quad (x0, x1, x2, x3) leaves two partial sums per channel in adjacent int32 lanes
//     (exact: no int16 saturation, unlike u8 x s8 vpmaddubsw), added at the group's end.
//   - scalar.
//
// Each thread takes a range of blocks and passes over it once per row tile (the tile's
// activations stay in L1). torch._int_mm has no fast CPU path without AVX512-VNNI (a scalar loop).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels.h"
#include "vec512.h"

#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace scalellm {
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

// f(scalar) with a value of t's element type, float32 or bfloat16
template <typename F>
void dispatch(const at::Tensor& t, F&& f) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  t.scalar_type() == at::kBFloat16 ? f(c10::BFloat16{}) : f(float{});
}


// ---- w8a8_linear ----------------------------------------------------------------------------

constexpr int64_t kBlockN = 16;  // output channels per packed block
constexpr int64_t kQuad = 4;     // consecutive k of a channel side by side in the packed layout
constexpr int64_t kGroup = 64;   // input channels per activation scale
constexpr int64_t kGroupQuads = kGroup / kQuad;

// The paths, as w8a8_linear's `path` argument and w8a8_paths() name them.
enum Path : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kVnni = 3, kAmx = 4 };

// One call's activations, quantized (a view of the buffers w8a8_linear fills).
struct Acts {
  const int32_t* quads;  // [rows, k4]: 4 consecutive int8 of xq per int32 (zeros past K)
  const int64_t* wide;   // [rows, k4]: the same 4 values as int16 (AVX2), or nullptr
  const float* scales;   // [rows, groups]: a[t, g] = max_{i in g} |x[t, i]| / 127
  const int32_t* corr;   // [rows, groups]: 128 * sum_{i in g} xq[t, i] (the VNNI path's offset)
  int64_t k4, groups;
};

// Each path computes, for R rows t0.. and the 16 channels c of one block,
//   acc[r][c] = fma(dot_G, a[G], ... fma(dot_1, a[1], fma(dot_0, a[0], 0)))
// with dot_g the group's exact int32 dot product (exactly a float32: |dot_g| < 2^21): the same
// float operations in the same order on every path, so every path returns the same bits.

template <int R>
void tile_scalar(float (*acc)[kBlockN], const Acts& v, int64_t t0, const int8_t* w) {
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < kBlockN; ++c) acc[r][c] = 0.f;
  for (int64_t g = 0; g < v.groups; ++g) {
    const int64_t j0 = g * kGroupQuads, j1 = std::min(v.k4, j0 + kGroupQuads);
    for (int r = 0; r < R; ++r) {
      const int8_t* x = reinterpret_cast<const int8_t*>(v.quads + (t0 + r) * v.k4);
      int32_t dot[kBlockN] = {};
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t c = 0; c < kBlockN; ++c)
          for (int64_t i = 0; i < kQuad; ++i) dot[c] += x[j * kQuad + i] * w[(j * kBlockN + c) * kQuad + i];
      const float a = v.scales[(t0 + r) * v.groups + g];
      for (int64_t c = 0; c < kBlockN; ++c) acc[r][c] = std::fma(static_cast<float>(dot[c]), a, acc[r][c]);
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Per half block (8 channels): a 16-byte load widened to int16 holds 4 channels x 4 k, and
// vpmaddwd against the broadcast (x0, x1, x2, x3) int16 quad leaves two partial sums per channel
// in adjacent int32 lanes (exact: no int16 saturation); a group's end adds the pairs (vphaddd).
template <int R>
void tile_avx2(float (*acc)[kBlockN], const Acts& v, int64_t t0, const int8_t* w) {
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < kBlockN; ++c) acc[r][c] = 0.f;
  for (int64_t h = 0; h < 2; ++h) {
    for (int64_t g = 0; g < v.groups; ++g) {
      const int64_t j0 = g * kGroupQuads, j1 = std::min(v.k4, j0 + kGroupQuads);
      __m256i lo[R], hi[R];  // channels 0-3 and 4-7 of the half, two partial sums each
      for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
      for (int64_t j = j0; j < j1; ++j) {
        const int8_t* wj = w + (j * kBlockN + h * 8) * kQuad;
        const __m256i w_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wj)));
        const __m256i w_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wj + 16)));
        for (int r = 0; r < R; ++r) {
          const __m256i xr = _mm256_set1_epi64x(v.wide[(t0 + r) * v.k4 + j]);
          lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(w_lo, xr));
          hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(w_hi, xr));
        }
      }
      for (int r = 0; r < R; ++r) {
        // hadd: [c0 c1 c4 c5 | c2 c3 c6 c7]; the 64-bit lanes (0, 2, 1, 3) put them in order
        const __m256i dot = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[r], hi[r]), 0xD8);
        const __m256 a = _mm256_set1_ps(v.scales[(t0 + r) * v.groups + g]);
        float* o = acc[r] + h * 8;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), a, _mm256_loadu_ps(o)));
      }
    }
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// One zmm of the packed weight is 16 channels x 4 k. vpdpbusd multiplies unsigned by signed bytes
// and adds each lane's 4 products to its int32: the weight, xor 0x80 (w + 128 in [1, 255]), times
// the broadcast signed activation quad gives dot + 128 * sum(xq) per channel; the per-row offset
// 128 * sum_g(xq) (Acts::corr) comes off at the group's end. No saturation (vpdpbusds would).
template <int R>
void tile_vnni(float (*acc)[kBlockN], const Acts& v, int64_t t0, const int8_t* w) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 f[R];
  for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < v.groups; ++g) {
    const int64_t j0 = g * kGroupQuads, j1 = std::min(v.k4, j0 + kGroupQuads);
    __m512i s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_si512();
    for (int64_t j = j0; j < j1; ++j) {
      const __m512i wj = _mm512_xor_si512(_mm512_loadu_si512(w + j * kBlockN * kQuad), flip);
      for (int r = 0; r < R; ++r) s[r] = _mm512_dpbusd_epi32(s[r], wj, _mm512_set1_epi32(v.quads[(t0 + r) * v.k4 + j]));
    }
    for (int r = 0; r < R; ++r) {
      const __m512i dot = _mm512_sub_epi32(s[r], _mm512_set1_epi32(v.corr[(t0 + r) * v.groups + g]));
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(v.scales[(t0 + r) * v.groups + g]), f[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc[r], f[r]);
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VNNI__)
#define SCALELLM_AMX 1
// Linux hands out the AMX tile state (8 KB of registers per thread) only on request, once per
// process; a kernel or hypervisor that refuses leaves the VNNI path.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h, fpu/types.h
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Tiles 0 and 3: C, 16 rows x 16 int32; 1 and 4: A, 16 rows of xq x 64 int8 (one group); 2 and
// 5: B, the group's 16 quads x (16 channels x 4 k), 64 bytes each: a [16, 16, 4] slice of the
// packed block. Two sets, for two groups in flight: one's tdpbssd runs while the other's
// int32 results are stored and added into float32.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16};
};

// 16 rows t0.. x the 16 channels of one block, for K a multiple of kGroup: tdpbssd (signed x
// signed, no offset) computes each group's 16 x 16 dot products in int32, which the same fma as
// the other paths' adds into float32 registers (the tiles configured by the caller's thread).
// Software-pipelined over two tile sets: group g + 1's tdpbssd is issued before group g's
// result is stored and added. `next` (or nullptr): the block to prefetch meanwhile, group by
// group, on the first pass over weights that come from memory (an lm_head: 0.8-0.93x the time).
#define SCALELLM_AMX_ISSUE(C, A, B, g)                                   \
  do {                                                                  \
    if (next != nullptr)                                                \
      for (int64_t i = 0; i < w_step; i += 64)                          \
        _mm_prefetch(reinterpret_cast<const char*>(next) + (g) * w_step + i, _MM_HINT_T0); \
    _tile_zero(C);                                                      \
    _tile_loadd(A, xq + (g) * kGroup, stride);                          \
    _tile_loadd(B, w + (g) * w_step, kBlockN * kQuad);                  \
    _tile_dpbssd(C, A, B);                                              \
  } while (0)
#define SCALELLM_AMX_FLUSH(C, g)                                                                        \
  do {                                                                                                 \
    _tile_stored(C, c, kBlockN * sizeof(int32_t));                                                     \
    _Pragma("GCC unroll 16") for (int r = 0; r < 16; ++r) f[r] = _mm512_fmadd_ps(                       \
        _mm512_cvtepi32_ps(_mm512_load_si512(c[r])), _mm512_set1_ps(a[r * groups + (g)]), f[r]);       \
  } while (0)
void tile_amx16(float (*acc)[kBlockN], const Acts& v, int64_t t0, const int8_t* w, const int8_t* next) {
  alignas(64) int32_t c[16][kBlockN];
  __m512 f[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) f[r] = _mm512_setzero_ps();
  const int8_t* xq = reinterpret_cast<const int8_t*>(v.quads + t0 * v.k4);
  const int64_t stride = v.k4 * kQuad, w_step = kGroupQuads * kBlockN * kQuad, groups = v.groups;
  const float* a = v.scales + t0 * groups;
  SCALELLM_AMX_ISSUE(0, 1, 2, 0);
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {  // group g in tile 0 on entry
    SCALELLM_AMX_ISSUE(3, 4, 5, g + 1);
    SCALELLM_AMX_FLUSH(0, g);
    if (g + 2 < groups) SCALELLM_AMX_ISSUE(0, 1, 2, g + 2);
    SCALELLM_AMX_FLUSH(3, g + 1);
  }
  if (g < groups) SCALELLM_AMX_FLUSH(0, g);
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) _mm512_storeu_ps(acc[r], f[r]);
}
#undef SCALELLM_AMX_ISSUE
#undef SCALELLM_AMX_FLUSH
#endif

// o[c] = acc[c] * w_scale[c] (+ bias[c]), rounded once to o's type, for the cols <= 16 channels
// of a block (AVX-512: the same float32 operations and rounding, 16 at a time)
template <typename T, typename W>
inline void store_row(T* o, const float* acc, const W* ws, const W* bias, int64_t cols) {
#if defined(__AVX512F__)
  if (cols == kBlockN) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(acc), load16(ws));
    if (bias != nullptr) v = _mm512_add_ps(v, load16(bias));
    store16(o, v);
    return;
  }
#endif
  for (int64_t c = 0; c < cols; ++c) {
    float v = acc[c] * static_cast<float>(ws[c]);
    if (bias != nullptr) v += static_cast<float>(bias[c]);
    o[c] = static_cast<T>(v);
  }
}

using TileFn = void (*)(float (*)[kBlockN], const Acts&, int64_t, const int8_t*);
constexpr int kMaxTile = 16;  // the most rows of any path's tile (AMX: 16; VNNI: 12 x 2 zmm + 2 of 32)
constexpr int kVnniRows = 12;
constexpr int64_t kWeightChunk = 1 << 20;  // bytes of weight blocks per pass of the row tiles (L2)


template <template <int> class K, int... Rs>
std::array<TileFn, sizeof...(Rs)> make_tiles(std::integer_sequence<int, Rs...>) {
  return {&K<Rs + 1>::run...};
}
#define SCALELLM_TILE_KERNEL(name, fn) \
  template <int R>                     \
  struct name {                        \
    static void run(float (*acc)[kBlockN], const Acts& v, int64_t t0, const int8_t* w) { fn<R>(acc, v, t0, w); } \
  };
SCALELLM_TILE_KERNEL(ScalarTile, tile_scalar)
#if defined(__AVX2__) && defined(__FMA__)
SCALELLM_TILE_KERNEL(Avx2Tile, tile_avx2)
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
SCALELLM_TILE_KERNEL(VnniTile, tile_vnni)
#endif

// The paths this build has, best last.
std::vector<int64_t> w8a8_paths() {
  std::vector<int64_t> paths{kScalar};
#if defined(__AVX2__) && defined(__FMA__)
  paths.push_back(kAvx2);
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  paths.push_back(kVnni);
#endif
#if defined(SCALELLM_AMX)
  if (amx_permitted()) paths.push_back(kAmx);
#endif
  return paths;
}

struct Tiles {
  const TileFn* fns;  // fns[R - 1] computes R rows
  int max_rows;
};

int64_t resolve_path(int64_t path) {
  const std::vector<int64_t> have = w8a8_paths();
  if (path == kAuto) return have.back();
  TORCH_CHECK(std::find(have.begin(), have.end(), path) != have.end(), "w8a8 path ", path,
              " is not in this build (w8a8_paths)");
  return path;
}

Tiles tiles_for(int64_t path) {
  static const auto scalar = make_tiles<ScalarTile>(std::make_integer_sequence<int, 4>{});
  if (path == kScalar) return {scalar.data(), 4};
#if defined(__AVX2__) && defined(__FMA__)
  static const auto avx2 = make_tiles<Avx2Tile>(std::make_integer_sequence<int, 6>{});
  if (path == kAvx2) return {avx2.data(), 6};
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  static const auto vnni = make_tiles<VnniTile>(std::make_integer_sequence<int, kVnniRows>{});
  if (path == kVnni || path == kAmx) return {vnni.data(), kVnniRows};  // AMX: rows past the 16s
#endif
  TORCH_CHECK(false, "unreachable");
}

}  // namespace

// out [T, N] = (x quantized per row and group of kGroup channels) @ (packed weight)^T, times the
// weight's scales, plus bias; `path` picks the inner kernel (kAuto: the best this build has).
void w8a8_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scales,
                 const std::optional<at::Tensor>& bias, int64_t requested) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x [T, K] with contiguous rows");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.is_contiguous() &&
                  packed.size(2) == kBlockN && packed.size(3) == kQuad,
              "packed int8 [N/16, K/4, 16, 4]");
  const int64_t rows = x.size(0), k = x.size(1), k4 = packed.size(1), n = out.size(1);
  const int64_t groups = (k + kGroup - 1) / kGroup;
  TORCH_CHECK(k4 == (k + kQuad - 1) / kQuad && packed.size(0) == (n + kBlockN - 1) / kBlockN,
              "packed weight's shape vs x, out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.is_contiguous() && out.scalar_type() == x.scalar_type(),
              "out [T, N] contiguous, x's dtype");
  TORCH_CHECK(w_scales.is_contiguous() && w_scales.numel() == n, "weight scales [N]");
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == w_scales.scalar_type(),
                        "bias [N], the scales' dtype");
  const int64_t path = resolve_path(requested);
  const Tiles tiles = tiles_for(path);
  // AMX: tiles of 16 rows while 16 are left, the rest on the VNNI kernel (the same bits); K must
  // be a multiple of kGroup (the tiles read whole groups), else every row goes to VNNI.
  const int64_t amx_rows = path == kAmx && k % kGroup == 0 ? rows / 16 * 16 : 0;
  const bool need_wide = path == kAvx2;
  at::Tensor quads = at::empty({rows, k4}, x.options().dtype(at::kInt));
  at::Tensor wide = at::empty({need_wide ? rows : 0, k4}, x.options().dtype(at::kLong));
  at::Tensor act_scales = at::empty({rows, groups}, x.options().dtype(at::kFloat));
  at::Tensor corr = at::empty({rows, groups}, x.options().dtype(at::kInt));
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    // raw pointers once: data_ptr<T>() checks the dtype on every call (~15% of a 1024-row call)
    const scalar_t* x_data = x.data_ptr<scalar_t>();
    int32_t* quads_data = quads.data_ptr<int32_t>();
    float* scales_data = act_scales.data_ptr<float>();
    int32_t* corr_data = corr.data_ptr<int32_t>();
    int64_t* wide_data = need_wide ? wide.data_ptr<int64_t>() : nullptr;
    const int64_t x_stride = x.stride(0);
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* xt = x_data + t * x_stride;
        int8_t* qt = reinterpret_cast<int8_t*>(quads_data + t * k4);
        float* at = scales_data + t * groups;
        int32_t* ct = corr_data + t * groups;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t len = std::min(kGroup, k - g * kGroup);
          quantize_row(qt + g * kGroup, at + g, xt + g * kGroup, len);
          int32_t sum = 0;
          for (int64_t i = 0; i < len; ++i) sum += qt[g * kGroup + i];
          ct[g] = 128 * sum;
        }
        for (int64_t i = k; i < k4 * kQuad; ++i) qt[i] = 0;
        if (need_wide) {
          int64_t* wt = wide_data + t * k4;
          for (int64_t j = 0; j < k4; ++j) {
            uint64_t v = 0;
            for (int64_t i = 0; i < kQuad; ++i)
              v |= static_cast<uint64_t>(static_cast<uint16_t>(static_cast<int16_t>(qt[j * kQuad + i]))) << (16 * i);
            wt[j] = static_cast<int64_t>(v);
          }
        }
      }
    });
  });
  const Acts acts{quads.data_ptr<int32_t>(), need_wide ? wide.data_ptr<int64_t>() : nullptr,
                  act_scales.data_ptr<float>(), corr.data_ptr<int32_t>(), k4, groups};
  // Row tiles of near-equal size (64 rows on a 12-row kernel: 5 x 11 + 9, not 5 x 12 + 4).
  const int64_t rest = rows - amx_rows;
  const int64_t n_tiles = (rest + tiles.max_rows - 1) / tiles.max_rows;
  const int64_t tile_rows = n_tiles > 0 ? (rest + n_tiles - 1) / n_tiles : 1;
  const int64_t blocks = packed.size(0);
  dispatch(out, [&](auto out_tag) {
    using out_t = decltype(out_tag);
    dispatch(w_scales, [&](auto w_tag) {
      using w_t = decltype(w_tag);
      const w_t* ws = w_scales.data_ptr<w_t>();
      const w_t* b = bias ? bias->data_ptr<w_t>() : nullptr;
      out_t* out_data = out.data_ptr<out_t>();
      const int8_t* packed_w = packed.data_ptr<int8_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
#if defined(SCALELLM_AMX)
        const TileConfig config;
        // Per thread and call, as the psABI has it (tile state is not preserved across calls):
        // whoever else uses the tiles (oneDNN) loads its own config. Not released after: a
        // tilerelease and the next call's first tile use cost ~4 us (measured), a third of a
        // 64-row qkv.
        if (amx_rows > 0) _tile_loadconfig(&config);
#endif
        float acc[kMaxTile][kBlockN];
        const auto store = [&](int64_t nb, int64_t t0, int tile) {
          const int64_t c0 = nb * kBlockN, cols = std::min(kBlockN, n - c0);
          for (int r = 0; r < tile; ++r)
            store_row(out_data + (t0 + r) * n + c0, acc[r], ws + c0, b ? b + c0 : b, cols);
        };
        const int64_t block_bytes = k4 * kBlockN * kQuad;
        // Row tiles outside, blocks inside: a tile's activations stay in L1 while the thread's
        // weight blocks stream past (measured single-threaded, 256 rows: 1.5-2x faster than
        // blocks outside, which reread every row's activations from L2 per block). Blocks in
        // chunks of ~kWeightChunk bytes that stay in L2 for all the row tiles, so a weight that
        // does not (an lm_head) is read from memory once, not once per row tile.
        const int64_t chunk = std::max<int64_t>(1, kWeightChunk / block_bytes);
        for (int64_t b0 = begin; b0 < end; b0 += chunk) {
          const int64_t b1 = std::min(end, b0 + chunk);
          for (int64_t t0 = 0; t0 < rows;) {
#if defined(SCALELLM_AMX)
            if (t0 < amx_rows) {
              for (int64_t nb = b0; nb < b1; ++nb) {
                tile_amx16(acc, acts, t0, packed_w + nb * block_bytes,
                           t0 == 0 && nb + 1 < b1 ? packed_w + (nb + 1) * block_bytes : nullptr);
                store(nb, t0, 16);
              }
              t0 += 16;
              continue;
            }
#endif
            const int tile = static_cast<int>(std::min(tile_rows, rows - t0));
            for (int64_t nb = b0; nb < b1; ++nb) {
              tiles.fns[tile - 1](acc, acts, t0, packed_w + nb * block_bytes);
              store(nb, t0, tile);
            }
            t0 += tile;
          }
        }
      });
    });
  });
}

}  // namespace scalellm

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("w8a8_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor w_scales, Tensor? bias, int path=0) -> ()");
  m.impl("w8a8_linear", c10::DispatchKey::CPU, scalellm::w8a8_linear);
  m.def("w8a8_paths() -> int[]", &scalellm::w8a8_paths);
}
