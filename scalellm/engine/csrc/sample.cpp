// Sampling's draw (CPU): temperature, top-k, top-p, min-p and a token by one uniform per row (a
// seeded row's from its request's generator: engine/sampler.py), from the model's logits as they
// are (float32 or bfloat16), in one call for the batch. engine/sampler.py's torch path does the
// same in separate ops over a float32 copy of the whole batch (the copy, the division, softmax,
// cumsum, a topk per rung; a seeded row a uniform per token): 4-45 ms for 64 rows of SmolLM2's
// 49152 logits on 2 Zen 4 cores by the parameters, 1-8 ms here (bench/sampler_truncation.py; a
// decode step of 64 streams: ~60 ms).
//
// Per row, in a buffer of the row's own:
//
//   peak       max_i x[i]                                 (a NaN or +inf: argmax's index instead)
//   e[i]       exp((x[i] - peak) / t), e[peak's] = 1      one vectorized pass, Z = sum e[i]
//   no top-k / top-p:   the tokens with e[i] >= min_p, in vocabulary order
//   top-k or top-p:     the candidates e[i] >= tau, tau the first of kThresholds (powers of two
//                       from 2^-2 to 2^-24, then 0) under which they are enough (count >= top_k;
//                       else mass >= top_p * Z), sorted largest first: the top_k first ones
//                       (renormalized over them), then those with mass above them < top_p, then
//                       those >= min_p
//   token      the first kept one whose running sum of e exceeds u * (their sum)
//
// A masked token (-inf: a grammar, a ban) has e = 0 and is never kept.
//
// The same kept tokens as the torch path (engine/sampler.py's ``truncate``), up to float32
// rounding of the sums at a top-p boundary; the draw inverts the kept tokens' CDF as ``_draw``
// does. Rows are independent: each one's token depends on its logits, parameters and uniform.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels.h"
#include "vec256.h"
#include "vec512.h"

namespace {

struct Params {
  float inv_t;     // 1 / temperature
  int64_t top_k;   // 0: none (also top_k >= V)
  float top_p;     // 1: none
  float min_p;     // 0: none
  float u;         // the row's uniform in [0, 1)
};

// e[i] = exp((x[i] - peak) * inv_t) for i < n (0 where x[i] is -inf); returns their sum.
template <typename T>
float exps(const T* x, int64_t n, float peak, float inv_t, float* e) {
  float total = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 top = _mm512_set1_ps(peak), scale = _mm512_set1_ps(inv_t);
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 xi = load16(x + i);  // -inf (a masked token): 0, not exp16's smallest value
    const __m512 v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(xi, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                         exp16(_mm512_mul_ps(_mm512_sub_ps(xi, top), scale)));
    _mm512_storeu_ps(e + i, v);
    sum = _mm512_add_ps(sum, v);
  }
  total = _mm512_reduce_add_ps(sum);
#elif defined(SCALELLM_AVX2)
  const __m256 top = _mm256_set1_ps(peak), scale = _mm256_set1_ps(inv_t);
  __m256 sum = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 xi = load8(x + i);  // -inf (a masked token): 0, not exp8's smallest value
    const __m256 v = _mm256_and_ps(_mm256_cmp_ps(xi, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                   exp8(_mm256_mul_ps(_mm256_sub_ps(xi, top), scale)));
    _mm256_storeu_ps(e + i, v);
    sum = _mm256_add_ps(sum, v);
  }
  total = hsum8(sum);
#endif
  for (; i < n; ++i) {
    e[i] = std::exp((static_cast<float>(x[i]) - peak) * inv_t);
    total += e[i];
  }
  return total;
}

// How many e[i] >= tau, and their sum.
inline std::pair<int64_t, float> at_least(const float* e, int64_t n, float tau) {
  int64_t count = 0, i = 0;
  float mass = 0.f;
#if defined(__AVX512F__)
  const __m512 floor = _mm512_set1_ps(tau);
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(e + i);
    const __mmask16 in = _mm512_cmp_ps_mask(v, floor, _CMP_GE_OQ);
    count += __builtin_popcount(in);
    sum = _mm512_mask_add_ps(sum, in, sum, v);
  }
  mass = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) {
    const bool in = e[i] >= tau;
    count += in;
    mass += in ? e[i] : 0.f;
  }
  return {count, mass};
}

// A token is kept (may be drawn) where its e is above 0 (not masked) and at least min-p's floor.
inline bool kept(float e, float floor) { return e > 0.f && e >= floor; }

// The first kept index whose running sum of e exceeds target; the last kept one where rounding
// leaves none. Chunks of 64 summed first (vectorized), then one chunk's values one by one.
inline int64_t invert(const float* e, int64_t n, float floor, float target) {
  constexpr int64_t kChunk = 64;
  float run = 0.f;
  int64_t last = 0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t end = std::min(n, c + kChunk);
    float chunk = 0.f;
    for (int64_t i = c; i < end; ++i) chunk += kept(e[i], floor) ? e[i] : 0.f;
    if (run + chunk <= target) {
      run += chunk;
      for (int64_t i = c; i < end; ++i) last = kept(e[i], floor) ? i : last;
      continue;
    }
    for (int64_t i = c; i < end; ++i) {
      if (!kept(e[i], floor)) continue;
      last = i;
      run += e[i];
      if (run > target) return i;
    }
  }
  return last;
}

constexpr float kThresholds[] = {0x1p-2f, 0x1p-4f, 0x1p-6f, 0x1p-8f, 0x1p-11f, 0x1p-14f, 0x1p-18f, 0x1p-24f, 0.f};

// A candidate as one sortable integer: its e's bits inverted above its token id. e >= 0, so the
// bits order as the values do, and ascending keys are the candidates largest first, ties in
// vocabulary order (an inlined integer compare: a comparator on (e, id) pairs was half the time
// of a flat top-p row).
using Key = uint64_t;
inline Key key(float e, int64_t i) {
  return (static_cast<uint64_t>(~c10::bit_cast<uint32_t>(e)) << 32) | static_cast<uint32_t>(i);
}
inline float value(Key k) { return c10::bit_cast<float>(~static_cast<uint32_t>(k >> 32)); }
inline int64_t token(Key k) { return static_cast<uint32_t>(k); }

// cand[0, c) = the keys of every e[i] >= tau, in vocabulary order; returns c. cand has room
// for n + 16 keys. AVX-512 builds 16 keys at once and packs the chosen ones with vpcompressq
// into a register, then stores all 8 lanes (the memory form of vpcompress is slow on Zen 4).
inline int64_t gather(const float* e, int64_t n, float tau, Key* cand) {
  int64_t c = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 floor = _mm512_set1_ps(tau);
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16, index = _mm512_add_epi32(index, _mm512_set1_epi32(16))) {
    const __m512 v = _mm512_loadu_ps(e + i);
    const __mmask16 in = _mm512_cmp_ps_mask(v, floor, _CMP_GE_OQ);
    if (!in) continue;
    const __m512i high = _mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(-1));
    for (int half = 0; half < 2; ++half) {
      const __mmask8 take = static_cast<__mmask8>(in >> (8 * half));
      const __m256i h = half ? _mm512_extracti64x4_epi64(high, 1) : _mm512_castsi512_si256(high);
      const __m256i t = half ? _mm512_extracti64x4_epi64(index, 1) : _mm512_castsi512_si256(index);
      const __m512i keys = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(h), 32), _mm512_cvtepu32_epi64(t));
      _mm512_storeu_si512(cand + c, _mm512_maskz_compress_epi64(take, keys));
      c += __builtin_popcount(take);
    }
  }
#endif
  for (; i < n; ++i)
    if (e[i] >= tau) cand[c++] = key(e[i], i);
  return c;
}

// keys[0, c) sorted ascending, given that keys with equal upper halves are already in order (the
// token ids gather wrote): a stable LSD radix sort of the upper 32 bits, 11, 11 and 10 bits a
// pass through tmp (c keys), a pass skipped where all keys share its digit; std::sort below 256.
inline void sort_keys(Key* keys, int64_t c, Key* tmp) {
  if (c < 256) {
    std::sort(keys, keys + c);
    return;
  }
  Key *src = keys, *dst = tmp;
  for (const auto& [shift, bits] : {std::pair{32, 11}, std::pair{43, 11}, std::pair{54, 10}}) {
    const uint64_t mask = (uint64_t{1} << bits) - 1;
    int64_t offset[2048] = {};
    for (int64_t i = 0; i < c; ++i) ++offset[(src[i] >> shift) & mask];
    if (offset[(src[0] >> shift) & mask] == c) continue;
    int64_t start = 0;
    for (int64_t d = 0; d <= static_cast<int64_t>(mask); ++d) start += std::exchange(offset[d], start);
    for (int64_t i = 0; i < c; ++i) dst[offset[(src[i] >> shift) & mask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys) std::copy(src, src + c, keys);
}

// One row's token: see the file's header. e: n floats; cand: 2n + 16 keys (gather's, then
// sort_keys' scratch).
template <typename T>
int64_t draw_row(const T* x, int64_t n, const Params& p, float* e, Key* cand) {
  const int64_t top = scalellm::argmax_row(x, n);  // the first NaN, else the first maximum
  const float peak = static_cast<float>(x[top]);
  if (!std::isfinite(peak)) return top;  // a NaN, +inf, or every token masked: argmax's index
  const float total = exps(x, n, peak, p.inv_t, e);
  const bool has_k = p.top_k > 0 && p.top_k < n;
  if (!has_k && p.top_p >= 1.f) {  // the whole distribution (min-p's floor: e of the peak is 1)
    const float mass = p.min_p > 0.f ? at_least(e, n, p.min_p).second : total;
    return invert(e, n, p.min_p, p.u * mass);
  }
  // candidates: every token at or above the first threshold under which there are enough
  float tau = 0.f;
  for (const float t : kThresholds) {
    tau = t;
    const auto [many, mass] = t > 0.f ? at_least(e, n, t) : std::pair<int64_t, float>{n, total};
    if (has_k ? many >= p.top_k : mass >= p.top_p * total) break;
  }
  const int64_t c = gather(e, n, tau, cand);
  int64_t count = has_k ? std::min<int64_t>(c, p.top_k) : c;
  if (count < c) {
    std::partial_sort(cand, cand + count, cand + c);  // top-k: the first count in order
  } else {
    sort_keys(cand, c, cand + n + 16);
  }
  float norm = total;  // the normalizer: over the top_k, else the whole vocabulary
  if (has_k) {
    norm = 0.f;
    for (int64_t j = 0; j < count; ++j) norm += value(cand[j]);
  }
  if (p.top_p < 1.f) {  // a token is cut when the mass above it already reaches top_p
    const float reach = p.top_p * norm;
    float above = 0.f;
    int64_t j = 0;
    for (; j < count && above < reach; ++j) above += value(cand[j]);
    count = std::max<int64_t>(j, 1);
  }
  const float floor = p.min_p * value(cand[0]);  // min-p: below min_p times the top token's
  while (count > 1 && !kept(value(cand[count - 1]), floor)) --count;
  float mass = 0.f;
  for (int64_t j = 0; j < count; ++j) mass += value(cand[j]);
  const float target = p.u * mass;
  float run = 0.f;
  for (int64_t j = 0; j < count; ++j) {
    run += value(cand[j]);
    if (run > target) return token(cand[j]);
  }
  return token(cand[count - 1]);
}

}  // namespace

namespace scalellm {
float exp_sum(const float* x, int64_t n, float peak, float inv_t, float* e) { return exps(x, n, peak, inv_t, e); }
float exp_sum(const c10::BFloat16* x, int64_t n, float peak, float inv_t, float* e) {
  return exps(x, n, peak, inv_t, e);
}
}  // namespace scalellm

namespace {

void sample_rows(const at::Tensor& out, const at::Tensor& x, const at::Tensor& temperature, const at::Tensor& top_k,
                 const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniforms) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1, "x [N, V], V > 0, rows contiguous");
  TORCH_CHECK(x.size(1) <= INT32_MAX, "a vocabulary of at most 2^31 - 1 tokens");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  TORCH_CHECK(out.dim() == 1 && out.size(0) == rows && out.scalar_type() == at::kLong && out.is_contiguous(),
              "out [N] int64");
  for (const at::Tensor* t : {&temperature, &top_p, &min_p, &uniforms})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "temperature, top_p, min_p, uniforms: [N] float32");
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == rows && top_k.scalar_type() == at::kLong && top_k.is_contiguous(),
              "top_k [N] int64");
  const float *t = temperature.data_ptr<float>(), *tp = top_p.data_ptr<float>(), *mp = min_p.data_ptr<float>(),
              *u = uniforms.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(t[r] > 0.f && tp[r] > 0.f && tp[r] <= 1.f && mp[r] >= 0.f && mp[r] <= 1.f && u[r] >= 0.f && u[r] < 1.f,
                "row ", r, ": temperature > 0, top_p in (0, 1], min_p in [0, 1], uniform in [0, 1)");
  int64_t* dst = out.data_ptr<int64_t>();
  auto run = [&](auto* base) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> e(n);
      std::vector<Key> cand(2 * n + 16);  // gather's keys (+ a store's slack), then radix's
      for (int64_t r = begin; r < end; ++r)
        dst[r] = draw_row(base + r * stride, n, Params{1.f / t[r], k[r], tp[r], mp[r], u[r]}, e.data(), cand.data());
    });
  };
  x.scalar_type() == at::kBFloat16 ? run(x.data_ptr<c10::BFloat16>()) : run(x.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("sample_rows(Tensor(a!) out, Tensor x, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
        "Tensor uniforms) -> ()");
  m.impl("sample_rows", c10::DispatchKey::CPU, sample_rows);
}
