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
//
// Where the compiler targets AVX-512 and D is 64 or 128, decode_heads_avx512 does a work item
// with D/16 registers per K/V row: a K row is dotted with each of the G query heads (from L1
// after the first), a V row loaded (and widened from bfloat16) once for all G, and the softmax's
// exp runs 16 lanes at a time. Scores of 16 tokens are summed across lanes together (reduce16);
// the next block is prefetched into L2 (~34 -> ~28 ms for 30 layers of 64 decodes of 100-200
// tokens in bfloat16 on a 2-core Xeon; docs/benchmarks.md), as is the next work item's first
// block. With AVX512-BF16 a bfloat16 K row is dotted as it is stored (vdpbf16ps,
// QueryHead<BFloat16>), not widened first, and P.V takes V rows in token pairs (pv_pairs: p
// rounded to bfloat16, V as stored; -16% kernel time at 64 decodes on the 2-core Zen 4). A work item
// is a (request, K/V head), or a whole request once every thread has four: then a block's K (then
// V) rows of all heads are read in one sweep, with less memory stall (the kernel is bound by
// memory at 64 decodes); the same sums in the same order, so the same bits. A context over
// kPartitionTokens is attended a partition per work item and the partitions merged (decode_items):
// one long decode then keeps every thread busy reading whole token rows.
// With AVX2 but not AVX-512 and D 64 or 128, decode_heads_avx2 does the same with 8-lane registers.
// Both take consecutive rows with the same block table (a decode and its draft tokens, each row
// seeing the context up to itself) as one work item, so a K or V row is read once for all of them:
//
//   rows   b0      b0+1     b0+2        (a token and two drafts; context_len 7, 8, 9)
//   K/V    t0 .. t6 | t7   | t8         row b sees t < context_len[b]; the item reads t < 9 once
//
// Each row's sums are those it gets in an item of its own (the same order), so the same bits.
// An int8 cache (engine/kv_quant.py: a row is D int8 values, then their float16 scale) goes
// through the same kernels with the cache's element type C = int8_t (T, the query's, otherwise):
//
//   scores[g, t] = scale_k[t] * (q_g . int8 K[t])      p[g, t] * scale_v[t] . int8 V[t]
//
// the values widened to float32 (exact; K's scores, where AVX512-VNNI is, by vpdpwssd over an
// int16 copy of the query, QueryHead<T, NV, int8_t>); prefill tiles dequantize each tile into T first, as
// kv_quant.dequantize_rows does; write_kv quantizes as kv_quant.quantize_rows does (same bytes).
// Elsewhere the scalar loops of decode_kernel (which the compiler vectorizes as it can; with AVX2
// the softmax's exp runs 8 lanes at a time, vec256.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "vec256.h"
#include "vec512.h"

namespace scalellm {
namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

constexpr int64_t kLanes = 16;  // one AVX-512 register of floats; the compiler vectorizes these loops

// The cache's element type C: float32 and bfloat16 rows (a token's K or V of one head) are the
// head's D values; an int8 row (engine/kv_quant.py) is D int8 values, x ~= q * scale, and then
// the scale as float16 (2 bytes): D + 2 elements.
template <typename C>
constexpr bool kInt8 = std::is_same_v<C, int8_t>;
template <typename C, int64_t D>
constexpr int64_t kRowWidth = kInt8<C> ? D + 2 : D;

// An int8 row's scale (head_dim values, then the float16).
inline float row_scale(const int8_t* row, int64_t head_dim) {
  c10::Half scale;
  std::memcpy(&scale, row + head_dim, sizeof(scale));
  return static_cast<float>(scale);
}

// Row of D values as float32: a copy for bfloat16, the row itself for float32, q * scale for int8.
inline const float* as_float(const float* row, int64_t, float*) { return row; }
inline const float* as_float(const c10::BFloat16* row, int64_t n, float* buf) {
  for (int64_t d = 0; d < n; ++d) buf[d] = to_float(row[d]);
  return buf;
}
inline const float* as_float(const int8_t* row, int64_t n, float* buf) {
  const float scale = row_scale(row, n);
  for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(row[d]) * scale;
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
// T: the query's and output's type; C: the cache's (T, or int8).
template <typename T, int64_t HEAD_DIM, typename C = T>
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
  const C* kv_ptr = kv.data_ptr<C>();
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
        const C* block = kv_ptr + table[first / block_size] * s_blk + h * s_head;
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
        int64_t t = 0;
#if defined(SCALELLM_AVX2)
        __m256 sum8 = _mm256_setzero_ps();
        for (; t + 8 <= len; t += 8) {
          const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(peak)));
          _mm256_storeu_ps(s + t, e);
          sum8 = _mm256_add_ps(sum8, e);
        }
        total = hsum8(sum8);
#endif
        for (; t < len; ++t) {
          s[t] = std::exp(s[t] - peak);
          total += s[t];
        }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t first = 0; first < len; first += block_size) {
        const C* block = kv_ptr + table[first / block_size] * s_blk + s_kv + h * s_head;
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


// Context tokens per partition of a decode: a row whose context is longer is attended one
// partition at a time, in work items of their own, and the partitions merged (decode_items).
constexpr int64_t kPartitionTokens = 1024;

// The partitions of a context of len tokens, `part` tokens each but the last, which also takes a
// remainder under a quarter of a partition (1152 tokens: one partition, not 1024 and 128).
inline int64_t partitions(int64_t len, int64_t part) {
  return std::max<int64_t>(1, len / part + (len % part >= part / 4 ? 1 : 0));
}

// The tokens of a row's context (len) in its partition k: [k * part, k * part + this).
inline int64_t tokens_in(int64_t len, int64_t part, int64_t k) {
  const int64_t n = partitions(len, part);
  return k < n - 1 ? part : k == n - 1 ? len - k * part : 0;
}

// A row's softmax over the tokens an item reads: the largest score and the sum of e^(s - peak).
struct Softmax {
  float peak, sum;
};

// Where a work item over one partition of a long context leaves the float32 results of its rows
// whose context spans partitions, for decode_items to merge (rows that fit one partition go to
// out as usual). Query head i of the item's, in row r:
//
//   at + r * row_stride + i * (D + 2):   [peak, sum, o_0 .. o_(D-1)]
//
// peak: the head's largest score in the partition; sum: the sum of e^(score - peak) there; o: the
// partition's P.V divided by that sum (out, had the context been this partition alone).
struct Partials {
  float* at;
  int64_t row_stride;
  const int64_t* whole;  // each row's whole context length
  int64_t tokens;        // a partition's (kPartitionTokens rounded up to whole blocks; see partitions)
};

// A work item of the vectorized kernels: K/V heads of one request's rows (see decode_items), over
// its whole context or one partition of it (then table, lens and len are the partition's).
struct Item {
  const int64_t* table;  // the rows' block ids
  const int64_t* lens;   // context tokens of each row (0: none in this partition)
  int64_t rows;          // consecutive rows with this block table: a decode and its draft tokens
  int64_t len;           // the longest row's context, the tokens the item reads
  const void* k;         // K of block 0, this head; block i at + i * s_blk, token j at + j * s_tok
  const void* v;
  int64_t s_blk, s_tok;  // strides in elements
  int64_t qs_b, os_b;    // q's and out's row strides
  const Partials* parts = nullptr;  // set for a partition of rows whose contexts span several
};

// Query head i of row r of an item, when that row's context spans partitions: where its
// [peak, sum, o] go; else null (the row is written to out).
inline float* partial_of(const Item& it, int64_t r, int64_t i, int64_t head_dim) {
  if (it.parts == nullptr || partitions(it.parts->whole[r], it.parts->tokens) == 1) return nullptr;
  return it.parts->at + r * it.parts->row_stride + i * (head_dim + 2);
}

// Where the query head qi of an item (row qi / nh, head qi % nh of its nh) reads and writes.
template <typename T>
inline const T* query_of(const Item& it, const T* q, int64_t qs_h, int64_t nh, int64_t qi) {
  return q + (qi / nh) * it.qs_b + (qi % nh) * qs_h;
}
template <typename T>
inline T* output_of(const Item& it, T* out, int64_t os_h, int64_t nh, int64_t qi) {
  return out + (qi / nh) * it.os_b + (qi % nh) * os_h;
}

// Asks for a block's K and V rows of this layer (every head) into L2 (prefetcht1). A work item
// prefetches each next block of its own as it goes; its first block would otherwise be a cold
// miss at the start of every item, so decode_items asks for the next item's while one runs.
template <typename T>
void prefetch_block(const at::Tensor& kv, int64_t block) {
  const char* k = reinterpret_cast<const char*>(kv.data_ptr<T>() + block * kv.stride(0));
  const char* v = k + kv.stride(1) * static_cast<int64_t>(sizeof(T));
  const int64_t bytes = kv.size(2) * kv.stride(2) * static_cast<int64_t>(sizeof(T));  // block_size rows
  for (int64_t at = 0; at < bytes; at += 64) {
    __builtin_prefetch(k + at, 0, 2);
    __builtin_prefetch(v + at, 0, 2);
  }
}

// Lines [from, to) of a block's K (or V) rows into L2: line l is line l % row_lines of token row
// l / row_lines (row_bytes apart); one division for the range, not one a line.
// Inlined: as a call it made the decode kernel 1.6x slower (the callers' live vectors spilled).
__attribute__((always_inline)) inline void prefetch_lines(const void* rows, int64_t row_bytes, int64_t row_lines,
                                                          int64_t from, int64_t to) {
  if (from >= to) return;
  int64_t row = from / row_lines, line = from % row_lines;
  for (int64_t l = from; l < to; ++l) {
    __builtin_prefetch(static_cast<const char*>(rows) + row * row_bytes + line * 64, 0, 2);
    if (++line == row_lines) line = 0, ++row;
  }
}

// The lines of a row of N elements into L2.
template <int64_t N, typename T>
__attribute__((always_inline)) inline void prefetch_row(const T* row) {
  for (int64_t at = 0; at < N * static_cast<int64_t>(sizeof(T)); at += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + at, 0, 2);
}

// Requests per thread from which a work item is a whole request (decode_items).
constexpr int64_t kRequestsPerThread = 4;

// out's rows whose context spans partitions, from their partitions' records (decode_items: row
// b's at records + offset[b], one of num_heads * (D + 2) floats per partition of its request),
// in partition order: out = sum_k w_k o_k / sum_k w_k, w_k = l_k e^(m_k - max_j m_j).
template <typename T, int64_t D>
void merge_partitions(const at::Tensor& out, const std::vector<float>& records, const std::vector<int64_t>& offset,
                      const int64_t* lens, int64_t part) {
  const int64_t batch = out.size(0), num_heads = out.size(1), record = num_heads * (D + 2);
  T* out_ptr = out.data_ptr<T>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = partitions(lens[b], part);  // this row's (its request's may be more)
      if (offset[b] < 0 || n == 1) continue;
      for (int64_t i = 0; i < num_heads; ++i) {
        const float* at = records.data() + offset[b] + i * (D + 2);
        float peak = at[0];
        for (int64_t k = 1; k < n; ++k) peak = std::max(peak, at[k * record]);
        float total = 0.f, sum[D] = {};
        for (int64_t k = 0; k < n; ++k) {
          const float* rec = at + k * record;
          const float w = rec[1] * std::exp(rec[0] - peak);
          total += w;
          for (int64_t d = 0; d < D; ++d) sum[d] += rec[2 + d] * w;
        }
        const float inv = 1.f / total;
        T* dst = out_ptr + b * out.stride(0) + i * out.stride(1);
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(sum[d] * inv);
      }
    }
  });
}

// The vectorized kernels' work items: one per request where there are enough of them to keep
// every thread busy (a block's heads read in one sweep), else one per (request, K/V head) so that
// a lone request still spreads over the threads. A request here is a run of consecutive rows
// with the same block table (a decode and its drafts; rows of one token each otherwise): whatever
// rows share a table attend over the same K/V, so reading it once for them is right for any rows.
// A context longer than a partition (P = kPartitionTokens) is split at multiples of P, an item
// per partition (the last one also takes a remainder under P / 4: `partitions`), and each row's
// partitions merged once all have run, from each one's (peak m, sum l, output o) (Partials):
//
//   context  | partition 0: t < P | partition 1: P <= t < 2P | ... | last: to the end |
//   item     (request, 0)           (request, 1)                         (x K/V head, as above)
//   merged   out = sum_k w_k o_k / sum_k w_k,    w_k = l_k e^(m_k - max_j m_j)
//
// so that one long decode is shared by every thread a request at a time (whole rows, each line
// read once) rather than by K/V heads, which split every token row's lines between threads and
// balance only as well as the heads divide among them (3 on 2 threads). The partitions depend on
// a row's own context length only, not on the batch or the threads, and a row that fits one
// partition is computed as before: its bits do not depend on what it is batched with.
// `heads` computes one item (D = head size, nh = item_heads * groups query heads a row):
//   heads(item, item_heads, q, q head stride, out, out head stride, groups, block_size, scale,
//         scores [rows * nh * len], accumulators [rows * nh * D])
// T: the query's and output's type; C: the cache's (T, or int8).
template <typename T, int64_t D, typename C = T, typename Heads>
void decode_items(Heads heads, const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv,
                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const int64_t batch = q.size(0), num_heads = q.size(1);
  const int64_t block_size = kv.size(2), num_kv_heads = kv.size(3);
  const int64_t groups = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t part = (kPartitionTokens + block_size - 1) / block_size * block_size;
  const T* q_ptr = q.data_ptr<T>();
  const C* kv_ptr = kv.data_ptr<C>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  std::vector<int64_t> firsts;  // each request's first row, then batch
  for (int64_t b = 0; b < batch; ++b)
    if (b == 0 || std::memcmp(tables + b * max_blocks, tables + (b - 1) * max_blocks, max_blocks * sizeof(int64_t)))
      firsts.push_back(b);
  firsts.push_back(batch);
  // starts[r]: request r's first partition, in request order; starts.back(): all of them
  std::vector<int64_t> starts;
  const auto count_partitions = [&] {
    starts.assign(1, 0);
    for (size_t r = 0; r + 1 < firsts.size(); ++r) {
      const int64_t longest = *std::max_element(lens + firsts[r], lens + firsts[r + 1]);
      starts.push_back(starts.back() + partitions(longest, part));
    }
  };
  count_partitions();
  int64_t requests = static_cast<int64_t>(firsts.size()) - 1;
  const int64_t threads = at::get_num_threads();
  // A whole request (partition) per item needs a row's heads adjacent (the engine's cache has
  // them so); taken with four a thread, or once long contexts' partitions give every thread one:
  // one decode of 4000 tokens on 2 threads, 4 partitions by request took 0.7-0.8x the time of 12
  // by (partition, head), which read a third of each token row's lines (bench/decode_kernel.py).
  const bool per_request = kv.stride(3) == kRowWidth<C, D> && (starts.back() >= kRequestsPerThread * threads ||
                                                  (starts.back() > requests && starts.back() >= threads));
  const int64_t item_heads = per_request ? num_kv_heads : 1;
  if (!per_request && starts.back() * num_kv_heads < 2 * threads && requests < batch) {
    // Too few (request, head) items to share out (one request with drafts and 3 K/V heads on 2
    // threads: 2 items against 1): each request's rows go in `parts` items, each reading the K/V.
    const int64_t parts = (2 * threads + starts.back() * num_kv_heads - 1) / (starts.back() * num_kv_heads);
    std::vector<int64_t> split;
    for (int64_t r = 0; r < requests; ++r) {
      const int64_t rows = firsts[r + 1] - firsts[r], step = (rows + parts - 1) / parts;
      for (int64_t b = firsts[r]; b < firsts[r + 1]; b += step) split.push_back(b);
    }
    split.push_back(batch);
    firsts.swap(split);
    requests = static_cast<int64_t>(firsts.size()) - 1;
    count_partitions();
  }
  // the Partials of requests with more than one partition: row b's at records + offset[b],
  // a record (every query head's [peak, sum, o]) per partition of its request
  const int64_t record = num_heads * (D + 2);
  std::vector<int64_t> offset(batch, -1);
  int64_t floats = 0;
  for (int64_t r = 0; r < requests; ++r)
    if (starts[r + 1] - starts[r] > 1)
      for (int64_t b = firsts[r]; b < firsts[r + 1]; ++b, floats += (starts[r + 1] - starts[r]) * record) offset[b] = floats;
  std::vector<float> records(floats);
  // item i: partition i / per (request r, its partition k), K/V heads h .. h + item_heads - 1
  const int64_t per = num_kv_heads / item_heads;
  const auto locate = [&](int64_t i, int64_t& r, int64_t& k, int64_t& h) {
    r = std::upper_bound(starts.begin(), starts.end(), i / per) - starts.begin() - 1;
    k = i / per - starts[r];
    h = i % per * item_heads;
  };
  at::parallel_for(0, starts.back() * per, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc, scores;
    std::vector<int64_t> within;  // the rows' tokens in a partition
    for (int64_t item = begin; item < end; ++item) {
      int64_t r, k, h;
      locate(item, r, k, h);
      const int64_t b = firsts[r], rows = firsts[r + 1] - b, n = starts[r + 1] - starts[r];
      const C* head = kv_ptr + h * kv.stride(3);
      Item it{tables + b * max_blocks, lens + b,     rows,        *std::max_element(lens + b, lens + b + rows),
              head,                    head + kv.stride(1), kv.stride(0), kv.stride(2),
              q.stride(0),             out.stride(0)};
      Partials parts{};
      if (n > 1) {
        within.resize(rows);
        for (int64_t i = 0; i < rows; ++i) within[i] = tokens_in(lens[b + i], part, k);
        it.table += k * part / block_size;
        it.lens = within.data();
        it.len = *std::max_element(within.begin(), within.end());
        parts = {records.data() + offset[b] + k * record + h * groups * (D + 2), n * record, lens + b, part};
        it.parts = &parts;
      }
      scores.resize(rows * item_heads * groups * it.len);
      acc.resize(rows * item_heads * groups * D);
      if (item + 1 < end) {  // the next item's first block, on its way while this item runs
        int64_t r2, k2, h2;
        locate(item + 1, r2, k2, h2);
        prefetch_block<C>(kv, tables[firsts[r2] * max_blocks + k2 * part / block_size]);
      }
      heads(it, item_heads, q_ptr + b * q.stride(0) + h * groups * q.stride(1), q.stride(1),
            out_ptr + b * out.stride(0) + h * groups * out.stride(1), out.stride(1), groups, block_size,
            static_cast<float>(scale), scores.data(), acc.data());
    }
  });
  if (floats > 0) merge_partitions<T, D>(out, records, offset, lens, part);
}

// Rows of a prefill chunk per work item of prefill_items.
constexpr int64_t kPrefillRows = 8;

// Every prefill chunk of a step through `heads` (the decode kernels' rows below; prefill_tiles
// with PIECE = kTilePiece on AVX-512), in one call. Chunk k is rows
// [start, start + n) of q; row i of it attends the chunk's cached context and, causally, the
// chunk up to itself: in decode_items' terms a row with context length context_len + i + 1, and
// the chunk's rows a run with one block table (its K/V is in the cache before attention runs).
//
//   rows    start .. start+7 | start+8 .. start+15 | ...     pieces of kPrefillRows rows
//   lens    c+1   .. c+8     | c+9     .. c+16     | ...     (c = context_len)
//
// A work item is a (piece, K/V head): the piece's rows read each K/V row of the head once. Late
// pieces of a chunk attend more tokens than early ones, so items go out longest first from a
// shared counter (an even split of a 128-token prompt's items gave one thread three times the
// other's work). Each row's sums are the ones paged_decode computes for that row, so a token's
// attention has the same bits whether it was prefilled, in whatever chunk, or decoded.
// PIECE: rows a work item; BUFFERS: whether `heads` takes the scores and accumulator buffers; C:
// the cache's element type (T, or int8).
template <typename T, int64_t D, int64_t PIECE = kPrefillRows, bool BUFFERS = true, typename C = T, typename Heads>
void prefill_items(Heads heads, const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv,
                   const at::Tensor& tables, const std::vector<int64_t>& lens,
                   const std::vector<std::array<int64_t, 3>>& chunks, double scale) {
  const int64_t block_size = kv.size(2), num_kv_heads = kv.size(3);
  const int64_t groups = q.size(1) / num_kv_heads, width = tables.size(1);
  struct Piece {
    int64_t chunk, row, rows, work;  // work: the (row, token) pairs it attends, to order by
  };
  std::vector<Piece> pieces;
  for (int64_t k = 0; k < static_cast<int64_t>(chunks.size()); ++k) {
    const auto [start, n, context] = chunks[k];
    for (int64_t i = 0; i < n; i += PIECE) {
      const int64_t rows = std::min(PIECE, n - i);
      pieces.push_back({k, start + i, rows, rows * (context + i + rows)});
    }
  }
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.work > b.work; });
  const int64_t items = static_cast<int64_t>(pieces.size()) * num_kv_heads;
  const T* q_ptr = q.data_ptr<T>();
  const C* kv_ptr = kv.data_ptr<C>();
  T* out_ptr = out.data_ptr<T>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> acc, scores;
    for (int64_t item = next++; item < items; item = next++) {
      const Piece& p = pieces[item / num_kv_heads];
      const int64_t h = item % num_kv_heads, b = p.row;
      const C* head = kv_ptr + h * kv.stride(3);
      const Item it{tables.data_ptr<int64_t>() + p.chunk * width,
                    lens.data() + b,
                    p.rows,
                    lens[b + p.rows - 1],
                    head,
                    head + kv.stride(1),
                    kv.stride(0),
                    kv.stride(2),
                    q.stride(0),
                    out.stride(0)};
      if (BUFFERS) {
        scores.resize(p.rows * groups * it.len);
        acc.resize(p.rows * groups * D);
      }
      heads(it, 1, q_ptr + b * q.stride(0) + h * groups * q.stride(1), q.stride(1),
            out_ptr + b * out.stride(0) + h * groups * out.stride(1), out.stride(1), groups, block_size,
            static_cast<float>(scale), scores.data(), acc.data());
    }
  });
}

#if defined(__AVX512F__)
// ---- AVX-512: one (request, K/V head) item, D = 16 * NV -------------------------------------

// r[i] = the sum of a[i]'s 16 lanes, for 16 vectors at once: a transpose and add in four rounds
// (45 instructions where 16 horizontal sums take ~130). reduce16_max: their maxima the same way.
template <typename Op>
inline __m512 reduce16_by(const __m512* a, Op op) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x, y = a[2i], a[2i+1]
    b[i] = op(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sums of a[4i], ..., a[4i + 3]
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // across the four 128-bit lanes: 0x88 takes lanes 0 and 2 of each operand, 0xDD lanes 1 and 3
  const __m512 e0 = op(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 e1 = op(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return op(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}
inline __m512 reduce16(const __m512* a) {
  return reduce16_by(a, [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); });
}
inline __m512 reduce16_max(const __m512* a) {
  return reduce16_by(a, [](__m512 x, __m512 y) { return _mm512_max_ps(x, y); });
}

// q . row, lane by lane (the lanes are summed later): D = 16 * NV products per row.
template <typename T, int64_t NV>
inline __m512 dot_row(const __m512* q, const T* row) {
  __m512 acc = _mm512_mul_ps(q[0], load16(row));
  for (int64_t v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(q[v], load16(row + 16 * v), acc);
  return acc;
}

// The float16 scales of int8 rows j < m (0 beyond), `stride` apart, D values each, as 16 floats.
template <int64_t D>
inline __m512 row_scales16(const int8_t* rows, int64_t stride, int64_t m) {
  alignas(32) uint16_t scales[16] = {};
  for (int64_t j = 0; j < std::min<int64_t>(m, 16); ++j) std::memcpy(&scales[j], rows + j * stride + D, sizeof(uint16_t));
  return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(scales)));
}

// One query head of type T, ready to score 16 K rows of R (T, or int8) at a time: scores16
// returns q . row_j for j < m (0 beyond), the rows `stride` elements apart. float32 arithmetic: q
// * scale once, then one accumulator per row, lane by lane (dot_row), their lanes summed together
// by reduce16 (16 horizontal sums cost more than the products). int8 rows (an int8 cache,
// engine/kv_quant.py) are widened to float32 (exact) and each sum multiplied by its row's scale
// (with AVX512-VNNI, the specialization below instead).
template <typename T, int64_t NV, typename R = T>
struct QueryHead {
  __m512 q[NV];
  QueryHead(const T* src, float scale) {
    for (int64_t v = 0; v < NV; ++v) q[v] = _mm512_mul_ps(load16(src + 16 * v), _mm512_set1_ps(scale));
  }
  __m512 scores16(const R* rows, int64_t stride, int64_t m) const {
    __m512 acc[16];
    for (int64_t j = 0; j < 16; ++j) acc[j] = j < m ? dot_row<R, NV>(q, rows + j * stride) : _mm512_setzero_ps();
    if constexpr (kInt8<R>)
      return _mm512_mul_ps(reduce16(acc), row_scales16<16 * NV>(rows, stride, m));
    else
      return reduce16(acc);
  }
};

#if defined(__AVX512BF16__)
// bfloat16 on CPUs with AVX512-BF16: vdpbf16ps multiplies 32 bfloat16 pairs and adds each lane's
// two products (exact in float32) to its float32 sum, so a K row is read as it is stored, 32
// values a load, with no widening: a third of the instructions a widened row takes, where the
// scores are bound by instructions, not memory (bench/decode_kernel.py on a 2-core Zen 4). The
// query stays bfloat16 and the scale multiplies the sums (the same as scaling q first where the
// scale is a power of two: head size 64); a float32 sum per lane, then reduce16, as above.
template <int64_t NV>
struct QueryHead<c10::BFloat16, NV, c10::BFloat16> {
  static_assert(NV % 2 == 0, "a head of 32 * (NV / 2) bfloat16 values");
  __m512bh q[NV / 2];
  __m512 scale;
  QueryHead(const c10::BFloat16* src, float s) : scale(_mm512_set1_ps(s)) {
    for (int64_t v = 0; v < NV / 2; ++v) q[v] = load32bh(src + 32 * v);
  }
  static __m512bh load32bh(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  __m512 scores16(const c10::BFloat16* rows, int64_t stride, int64_t m) const {
    __m512 acc[16];
    for (int64_t j = 0; j < 16; ++j) {
      acc[j] = _mm512_setzero_ps();
      if (j < m)
        for (int64_t v = 0; v < NV / 2; ++v)
          acc[j] = _mm512_dpbf16_ps(acc[j], q[v], load32bh(rows + j * stride + 32 * v));
    }
    return _mm512_mul_ps(reduce16(acc), scale);
  }
};
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 K rows on CPUs with AVX512-VNNI: the query head quantized to int16 once (q ~= q16 * qs,
// qs = max|q| / 32767: a step of 2^-15 of the head's largest value, finer than bfloat16's 2^-8 or
// the int8 row's own 2^-7), and vpdpwssd multiplies 32 int16 pairs, the row's int8 values
// sign-extended (vpmovsxbw), adding each lane's two products to its int32 sum: exact, where the
// widened float32 path takes three instructions (widen, convert, FMA) for 16 products and
// bfloat16 queries widen too. A row's sums: reduce16 over int32 lanes, then one conversion times
// qs, the softmax scale and the row's float16 scale. |sum| <= D * 32767 * 127 < 2^31 for D <= 128.
template <typename T, int64_t NV>
struct QueryHead<T, NV, int8_t> {
  static_assert(NV % 2 == 0 && NV <= 8, "a head of 32 * (NV / 2) values, at most 128");
  __m512i q[NV / 2];
  __m512 scale;  // qs times the softmax scale
  QueryHead(const T* src, float s) {
    constexpr int64_t D = 16 * NV;
    float top = 0.f;
    for (int64_t d = 0; d < D; ++d) top = std::max(top, std::fabs(to_float(src[d])));
    const float qs = top > 0.f ? top / 32767.f : 1.f;
    alignas(64) int16_t q16[D];
    for (int64_t d = 0; d < D; ++d) q16[d] = static_cast<int16_t>(std::nearbyint(to_float(src[d]) / qs));
    for (int64_t v = 0; v < NV / 2; ++v) q[v] = _mm512_load_si512(q16 + 32 * v);
    scale = _mm512_set1_ps(s * qs);
  }
  __m512 scores16(const int8_t* rows, int64_t stride, int64_t m) const {
    __m512 acc[16];  // int32 sums, in float registers' bits for reduce16_by's shuffles
    for (int64_t j = 0; j < 16; ++j) {
      __m512i sum = _mm512_setzero_si512();
      if (j < m)
        for (int64_t v = 0; v < NV / 2; ++v) {
          const __m256i k8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + j * stride + 32 * v));
          sum = _mm512_dpwssd_epi32(sum, q[v], _mm512_cvtepi8_epi16(k8));
        }
      acc[j] = _mm512_castsi512_ps(sum);
    }
    const __m512 sums = reduce16_by(acc, [](__m512 x, __m512 y) {
      return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(x), _mm512_castps_si512(y)));
    });
    const __m512 dots = _mm512_cvtepi32_ps(_mm512_castps_si512(sums));
    return _mm512_mul_ps(_mm512_mul_ps(dots, scale), row_scales16<16 * NV>(rows, stride, m));
  }
};
#endif

// s[t] = e^(s[t] - max s) for t < len, in place; returns max s and their sum.
inline Softmax softmax_numerators(float* s, int64_t len) {
  __m512 peak = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < len; t += 16) {
    const __mmask16 m = len - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - t)) - 1);
    peak = _mm512_max_ps(peak, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, s + t));
  }
  const float largest = _mm512_reduce_max_ps(peak);
  const __m512 top = _mm512_set1_ps(largest);
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; t += 16) {
    const __mmask16 m = len - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - t)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), top));
    _mm512_mask_storeu_ps(s + t, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  return {largest, _mm512_reduce_add_ps(total)};
}

// P.V over token pairs (bfloat16 with AVX512-BF16): vdpbf16ps multiplies a lane's two bfloat16
// values by two others and adds both products to a float32 sum, so two V rows interleaved,
// (V[j][d], V[j + 1][d]) in a 32-bit lane, times (p[j], p[j + 1]) rounded to bfloat16 (as GPU
// flash kernels round p), are two tokens' products in one instruction, V read as stored (no
// widening). Pairs are (j, j + 1) from a block's first token, the last one of an odd count
// paired with a zero p: a row's pairs do not depend on the rows or heads beside it. The unpacks
// work within 128-bit lanes, so the accumulators hold d in the order
//
//   register 2u:     d = 32u + {0-3, 8-11, 16-19, 24-27}      (unpacklo of V[j], V[j + 1])
//   register 2u + 1: d = 32u + {4-7, 12-15, 20-23, 28-31}     (unpackhi)
//
// until unpair_pv puts them back in order at the end.
template <typename T>
constexpr bool kPairedPV = false;
#if defined(__AVX512BF16__)
template <>
constexpr bool kPairedPV<c10::BFloat16> = true;

inline uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(c10::BFloat16(lo).x) | (static_cast<uint32_t>(c10::BFloat16(hi).x) << 16);
}

// acc[g][.] += sum over this block's n tokens of p_g[j] * V[j] for the gn query heads whose
// (unnormalized) p are at p + g * ps; rows: the block's V rows of one head, stride apart; next
// (or null): the next block's rows of the head, asked into L2 a row for each row read
template <int64_t NV, int64_t GC>
inline void pv_pairs(__m512 (&acc)[GC][NV], int64_t gn, const c10::BFloat16* rows, int64_t stride, int64_t n,
                     const float* p, int64_t ps, const c10::BFloat16* next) {
  for (int64_t j = 0; j < n; j += 2) {
    const bool two = j + 1 < n;
    const c10::BFloat16* a = rows + j * stride;
    if (next != nullptr) {
      prefetch_row<32 * NV>(next + j * stride);
      prefetch_row<32 * NV>(next + (j + 1) * stride);
    }
    __m512i pairs[NV];
    for (int64_t u = 0; u < NV / 2; ++u) {
      const __m512i va = _mm512_loadu_si512(a + 32 * u);
      const __m512i vb = two ? _mm512_loadu_si512(a + stride + 32 * u) : _mm512_setzero_si512();
      pairs[2 * u] = _mm512_unpacklo_epi16(va, vb);
      pairs[2 * u + 1] = _mm512_unpackhi_epi16(va, vb);
    }
    for (int64_t g = 0; g < gn; ++g) {
      const float* pg = p + g * ps;
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(bf16_pair(pg[j], two ? pg[j + 1] : 0.f)));
      for (int64_t v = 0; v < NV; ++v) acc[g][v] = _mm512_dpbf16_ps(acc[g][v], (__m512bh)pairs[v], pp);
    }
  }
}

// a head's D sums from pv_pairs' order back to d order, in place: d = 32u + 8c + i (c the 128-bit
// lane) is lo's lane 4c + i for i < 4, hi's lane 4c + i - 4 else (permutex2var: hi's lanes are 16-31)
template <int64_t NV>
inline void unpair_pv(float* acc) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t u = 0; u < NV / 2; ++u) {
    const __m512 lo = _mm512_loadu_ps(acc + 32 * u), hi = _mm512_loadu_ps(acc + 32 * u + 16);
    _mm512_storeu_ps(acc + 32 * u, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(acc + 32 * u + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
}
#else
template <int64_t NV, int64_t GC>
inline void pv_pairs(__m512 (&)[GC][NV], int64_t, const c10::BFloat16*, int64_t, int64_t, const float*, int64_t,
                     const c10::BFloat16*) {}
template <int64_t NV>
inline void unpair_pv(float*) {}
#endif

// G query heads at a time keep their accumulators in registers (G * NV <= 16 of 32 zmm).
template <int64_t NV>
constexpr int64_t kGroupChunk = NV <= 4 ? 4 : 2;

// K/V heads h0 .. h0 + H - 1 of one request (it.k, it.v: head h0's rows; the H heads adjacent in
// a row, D apart) and their H * G query heads in each of the request's rows, block by block:
//
//   scores[g, t] = q_g . k_t         16 tokens at a time (QueryHead::scores16), a block's K rows of
//                                    the H heads in one sweep, t below g's row's context length
//   p[g, :]      = softmax(scores[g, :])
//   out_g        = sum_t p[g, t] v_t  per block and head, that head's query heads' accumulators
//                                    brought into registers (acc_buf [H * G, D] between blocks)
//
// A work item is one head (H = 1) or a whole request (H = Hkv, decode_items): the same sums in
// the same order either way, so the same bits. The next block's K lines are prefetched a share
// per query head, between the heads' scores, not in one burst that fills the line-fill buffers;
// V's in the P.V pass, a row of the next block for each row P.V reads (fetched with K, a long
// context's V was evicted from L2 by the rest of the K pass before P.V read it; in shares per
// K/V head, 5-12% slower than row by row). bench/decode_kernel.py, 30 layers, 64 decodes of
// ~185 tokens, bfloat16, 2 threads on the 2-core Xeon: 0.79-0.85 ms a layer by request against
// 0.88-0.96 by (request, head). Into L2 (prefetcht1), not L1: 18% less time than prefetcht0 at 64
// decodes in both dtypes on the 2-core Zen 4 (docs/benchmarks.md).
// T: the query's and output's type; C: the cache's, T or int8 (then a K row's scores take its
// scale, QueryHead, and a V row's scale multiplies its p; rows are W = D + 2 apart).
template <typename T, int64_t NV, typename C = T>
void decode_heads_avx512(const Item& it, int64_t num_kv_heads, const T* q, int64_t qs_h, T* out, int64_t os_h,
                         int64_t groups, int64_t block_size, float scale, float* scores, float* acc_buf) {
  constexpr int64_t D = 16 * NV, W = kRowWidth<C, D>;
  constexpr bool paired = kPairedPV<T> && std::is_same_v<C, T>;
  const C* kbase = static_cast<const C*>(it.k);
  const C* vbase = static_cast<const C*>(it.v);
  // query head qi: row qi / nh, head qi % nh of that row, K/V head (qi % nh) / groups; its scores
  // at scores + qi * len, over that row's own context
  const int64_t len = it.len, nh = num_kv_heads * groups, num_heads = it.rows * nh;
  std::vector<QueryHead<T, NV, C>> heads;
  heads.reserve(num_heads);
  for (int64_t qi = 0; qi < num_heads; ++qi) heads.emplace_back(query_of(it, q, qs_h, nh, qi), scale);
  // a block's lines of these heads: row_lines per token row, a share of them per query head
  const int64_t row_lines = (num_kv_heads * W * static_cast<int64_t>(sizeof(C)) + 63) / 64;
  const int64_t lines = block_size * row_lines, per_head = (lines + num_heads - 1) / num_heads;
  const int64_t row_bytes = it.s_tok * static_cast<int64_t>(sizeof(C));
  for (int64_t first = 0; first < len; first += block_size) {
    const int64_t index = first / block_size, n = std::min(block_size, len - first);
    const bool fetch = first + block_size < len;
    const C* knext = fetch ? kbase + it.table[index + 1] * it.s_blk : nullptr;
    const C* block = kbase + it.table[index] * it.s_blk;
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      // query head qi = r * nh + g * groups + i: row r, K/V head g (no divisions in the loop)
      for (int64_t r = 0, qi = 0; r < it.rows; ++r) {
        // the tokens of this block and of this row from j0 on, 16 at most
        const int64_t m = std::min<int64_t>(16, std::min(n, it.lens[r] - first) - j0);
        for (int64_t g = 0; g < num_kv_heads; ++g)
          for (int64_t i = 0; i < groups; ++i, ++qi) {
            if (m > 0)
              _mm512_mask_storeu_ps(scores + qi * len + first + j0, __mmask16(m == 16 ? 0xFFFF : (1u << m) - 1),
                                    heads[qi].scores16(block + g * W + j0 * it.s_tok, it.s_tok, m));
            if (fetch && j0 == 0)
              prefetch_lines(knext, row_bytes, row_lines, qi * per_head, std::min(lines, (qi + 1) * per_head));
          }
      }
    }
  }
  std::vector<Softmax> soft(num_heads);
  for (int64_t qi = 0; qi < num_heads; ++qi) soft[qi] = softmax_numerators(scores + qi * len, it.lens[qi / nh]);
  constexpr int64_t GC = kGroupChunk<NV>;
  std::fill(acc_buf, acc_buf + num_heads * D, 0.f);
  for (int64_t first = 0; first < len; first += block_size) {
    const int64_t index = first / block_size;
    const C* block = vbase + it.table[index] * it.s_blk;
    // V's next block, each row of a head as the first row's P.V reads this block's (not during
    // the K pass: at long contexts the rest of the K pass evicted it from L2 before P.V read it)
    const C* vnext = first + block_size < len ? vbase + it.table[index + 1] * it.s_blk : nullptr;
    for (int64_t r = 0; r < it.rows; ++r) {
      const int64_t n = std::min(block_size, it.lens[r] - first);  // this row's tokens here
      for (int64_t h = 0; h < num_kv_heads && n > 0; ++h) {
        for (int64_t g0 = r * nh + h * groups; g0 < r * nh + (h + 1) * groups; g0 += GC) {
          const int64_t gn = std::min(GC, r * nh + (h + 1) * groups - g0);
          // the head's next rows, asked for once: by the first row's first chunk of query heads
          const C* next = r == 0 && g0 == h * groups && vnext != nullptr ? vnext + h * W : nullptr;
          __m512 acc[GC][NV];
          for (int64_t g = 0; g < gn; ++g)
            for (int64_t v = 0; v < NV; ++v) acc[g][v] = _mm512_loadu_ps(acc_buf + (g0 + g) * D + 16 * v);
          if constexpr (paired) {
            pv_pairs<NV, GC>(acc, gn, block + h * D, it.s_tok, n, scores + g0 * len + first, len, next);
          } else {
            for (int64_t j = 0; j < n; ++j) {
              const C* row = block + j * it.s_tok + h * W;
              if (next != nullptr) prefetch_row<W>(next + j * it.s_tok);
              __m512 val[NV];
              for (int64_t v = 0; v < NV; ++v) val[v] = load16(row + 16 * v);
              float vscale = 1.f;  // int8: p times the row's scale (its values times the scale: V)
              if constexpr (kInt8<C>) vscale = row_scale(row, D);
              for (int64_t g = 0; g < gn; ++g) {
                const float pj = scores[(g0 + g) * len + first + j];
                const __m512 p = _mm512_set1_ps(kInt8<C> ? pj * vscale : pj);
                for (int64_t v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(p, val[v], acc[g][v]);
              }
            }
          }
          for (int64_t g = 0; g < gn; ++g)
            for (int64_t v = 0; v < NV; ++v) _mm512_storeu_ps(acc_buf + (g0 + g) * D + 16 * v, acc[g][v]);
        }
      }
    }
  }
  for (int64_t qi = 0; qi < num_heads; ++qi) {
    if (it.lens[qi / nh] <= 0) continue;  // a row with no tokens in this partition
    if constexpr (paired) unpair_pv<NV>(acc_buf + qi * D);
    float* part = partial_of(it, qi / nh, qi % nh, D);
    float row[D];
    float* o = part != nullptr ? part + 2 : row;
    const __m512 inv = _mm512_set1_ps(1.f / soft[qi].sum);
    for (int64_t v = 0; v < NV; ++v) _mm512_storeu_ps(o + 16 * v, _mm512_mul_ps(_mm512_loadu_ps(acc_buf + qi * D + 16 * v), inv));
    if (part != nullptr) {
      part[0] = soft[qi].peak, part[1] = soft[qi].sum;
      continue;
    }
    T* dst = output_of(it, out, os_h, nh, qi);
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(row[d]);
  }
}

// ---- prefill in tiles (AVX-512; bfloat16 needs AVX512-BF16) --------------------------------
//
// paged_prefill's kernel for float32, and for bfloat16 where the CPU has vdpbf16ps. A work item
// (prefill_items) is kTilePiece tokens of a chunk and one K/V head: R = tokens * G query rows
// (row r: token r / G, query head r % G of the K/V head's G), over the chunk's context 16 tokens
// at a time, with flash attention's online softmax (a running max m_r and sum l_r in float32;
// 16 rows' maxima and sums in one register, reduce16_max and reduce16):
//
//   kt         the tile's K transposed (transpose16): 16 tokens in a register's lanes
//   S[r]       lane j = scale * q_r . K[j]                       RS = 16 rows in registers
//   p[r]       = e^(S[r] - m_r) for the tokens row r sees, 0 past them
//   acc_r      = acc_r * e^(m_old - m_r) + sum_j p[r][j] V[j]    RP rows' accumulators in registers
//
// TileMath<T, D> holds what depends on the element type. float32: one FMA a head dim for 16
// scores, and P.V by FMAs over V's rows as stored. bfloat16: vdpbf16ps over K in bfloat16 pairs
// (kt[dp] lane j = K[j][2dp..2dp+1]), and P.V by vdpbf16ps over V's token pairs interleaved,
// p rounded to bfloat16 first as GPU flash kernels do: 32 multiply-adds an instruction in both
// products. The decode kernels' rows (paged_decode, and paged_prefill on AVX2) instead dot each
// row with 16 K rows and sum lanes. A tiled row no longer has a decoded row's bits (tested
// against SDPA within the dtype's tolerance). On the 2-core Zen 4 (bench/prefill_attention.py
// --device cpu, docs/benchmarks.md) bfloat16 runs at 2.4-4.3x SDPA's speed from 128 to 8k tokens
// of context (0.15-0.28 TFLOPS on two threads), float32 at 1.2-2.5x (0.08-0.15 TFLOPS); the rows
// kernel at 0.1 and 0.07.
constexpr int64_t kTileTokens = 16;  // a register's lanes of scores
constexpr int64_t kTilePiece = 32;   // tokens of a chunk per work item: its K tiles transposed once for them

// out[i] lane j = in[j] lane i: a 16 x 16 transpose of 32-bit words in 64 shuffles.
//   stage 1-2 (unpack 32, 64): u[4k + c] 128-bit lane L = words 4L + c of rows 4k .. 4k + 3
//   stage 3-4 (shuffle_i32x4): out[4L + c] lane k = u[4k + c] lane L
inline void transpose16(const __m512i (&in)[16], __m512i* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(in[2 * i], in[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(in[2 * i], in[2 * i + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i s0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), s1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    out[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    out[4 + c] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    out[8 + c] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

// A tile's c token rows of `words` 32-bit words (row j at rows + j * stride words) transposed:
// out[w] lane j = word w of row j, 0 for j >= c. Loads and shuffles rather than a gather per
// word: the tiles ran 3-8% faster on the 2-core Zen 4.
template <int64_t WORDS>
inline void transpose_rows(const int32_t* rows, int64_t stride, int64_t c, __m512i* out) {
  for (int64_t w0 = 0; w0 < WORDS; w0 += 16) {
    __m512i in[16];
    for (int64_t j = 0; j < 16; ++j) in[j] = j < c ? _mm512_loadu_si512(rows + j * stride + w0) : _mm512_setzero_si512();
    transpose16(in, out + w0);
  }
}

template <typename T, int64_t D>
struct TileMath;

template <int64_t D>
struct TileMath<float, D> {
  using QWord = float;  // what a query row is read as
  using PWord = float;  // what a row's probabilities are kept as
  static constexpr int64_t NA = D / 16, PW = 16;  // accumulators a row; PWords a row's p
  __m512 kt[D];
  const float* v = nullptr;
  int64_t stride = 0, count = 0;

  void load(const float* k, const float* vrow, int64_t s_tok, int64_t c) {
    __m512i words[D];
    transpose_rows<D>(reinterpret_cast<const int32_t*>(k), s_tok, c, words);
    for (int64_t d = 0; d < D; ++d) kt[d] = _mm512_castsi512_ps(words[d]);
    v = vrow, stride = s_tok, count = c;
  }
  template <int64_t RS>
  void scores(__m512* s, const QWord* const* q) const {
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < RS; ++r) s[r] = _mm512_fmadd_ps(kt[d], _mm512_set1_ps(q[r][d]), s[r]);
  }
  static void store_p(PWord* p, __m512 e) { _mm512_storeu_ps(p, e); }
  template <int64_t RP>
  void pv(__m512 (&a)[RP][NA], const PWord* p) const {  // row r's p at p + r * PW
    for (int64_t j = 0; j < count; ++j) {
      __m512 val[NA];
      for (int64_t k = 0; k < NA; ++k) val[k] = _mm512_loadu_ps(v + j * stride + 16 * k);
      for (int64_t r = 0; r < RP; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r * PW + j]);
        for (int64_t k = 0; k < NA; ++k) a[r][k] = _mm512_fmadd_ps(pj, val[k], a[r][k]);
      }
    }
  }
  static int64_t dim_of(int64_t k, int64_t j) { return 16 * k + j; }
};

#if defined(__AVX512BF16__)
template <int64_t D>
struct TileMath<c10::BFloat16, D> {
  using QWord = int32_t;   // a pair of bfloat16
  using PWord = uint32_t;  // a pair of bfloat16 probabilities
  static constexpr int64_t NA = D / 16, PW = 8;
  __m512i kt[D / 2], vp[kTileTokens / 2][NA];
  int64_t pairs = 0;

  void load(const c10::BFloat16* k, const c10::BFloat16* vrow, int64_t s_tok, int64_t c) {
    transpose_rows<D / 2>(reinterpret_cast<const int32_t*>(k), s_tok / 2, c, kt);
    // V's token pairs interleaved per head dim; a missing second token of the last pair is zero
    pairs = (c + 1) / 2;
    for (int64_t t2 = 0; t2 < pairs; ++t2)
      for (int64_t z = 0; z < D / 32; ++z) {
        const __m512i a = _mm512_loadu_si512(vrow + 2 * t2 * s_tok + 32 * z);
        const __m512i b = 2 * t2 + 1 < c ? _mm512_loadu_si512(vrow + (2 * t2 + 1) * s_tok + 32 * z) : _mm512_setzero_si512();
        vp[t2][2 * z] = _mm512_unpacklo_epi16(a, b);
        vp[t2][2 * z + 1] = _mm512_unpackhi_epi16(a, b);
      }
  }
  template <int64_t RS>
  void scores(__m512* s, const QWord* const* q) const {
    for (int64_t dp = 0; dp < D / 2; ++dp)
      for (int64_t r = 0; r < RS; ++r) s[r] = _mm512_dpbf16_ps(s[r], (__m512bh)kt[dp], (__m512bh)_mm512_set1_epi32(q[r][dp]));
  }
  static void store_p(PWord* p, __m512 e) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(e)); }
  template <int64_t RP>
  void pv(__m512 (&a)[RP][NA], const PWord* p) const {  // row r's p pairs at p + r * PW
    for (int64_t t2 = 0; t2 < pairs; ++t2)
      for (int64_t r = 0; r < RP; ++r) {
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(p[r * PW + t2]));
        for (int64_t k = 0; k < NA; ++k) a[r][k] = _mm512_dpbf16_ps(a[r][k], (__m512bh)vp[t2][k], pp);
      }
  }
  // unpack interleaves within 128-bit lanes: accumulator 2z holds dims 0-3, 8-11, 16-19, 24-27 of
  // V's 32-dim register z, accumulator 2z + 1 the rest
  static int64_t dim_of(int64_t k, int64_t j) { return 32 * (k / 2) + 8 * (j / 4) + 4 * (k % 2) + j % 4; }
};
#endif  // __AVX512BF16__

// Per-thread buffers of prefill_tiles, sized for the largest item it has seen.
template <typename M>
struct TileScratch {
  std::vector<float> acc, m, l, corr;
  std::vector<typename M::PWord> p;       // each row's probabilities for the current tile
  std::vector<int64_t> len, seen;         // each row's context; how many of the tile's tokens it sees
  std::vector<const typename M::QWord*> q;  // each row's query
};

// c rows of an int8 cache (stride elements apart) dequantized into dst [c, D] of T: each value
// times its row's scale in float32, rounded to T, as kv_quant.dequantize_rows does.
template <typename T, int64_t D>
void dequantize_tile(T* dst, const int8_t* rows, int64_t stride, int64_t c) {
  for (int64_t j = 0; j < c; ++j) {
    const __m512 scale = _mm512_set1_ps(row_scale(rows + j * stride, D));
    for (int64_t v = 0; v < D / 16; ++v)
      store16(dst + j * D + 16 * v, _mm512_mul_ps(load16(rows + j * stride + 16 * v), scale));
  }
}

// One work item, in decode_heads_avx512's signature (scores and acc_buf unused: TileScratch).
// C: the cache's element type, T or int8 (each tile's rows then dequantized first: dequantize_tile).
template <typename T, int64_t D, typename C = T>
void prefill_tiles(const Item& it, int64_t num_kv_heads, const T* q, int64_t qs_h, T* out, int64_t os_h,
                   int64_t groups, int64_t block_size, float scale, float*, float*) {
  using M = TileMath<T, D>;
  constexpr int64_t NA = M::NA, PW = M::PW;
  constexpr int64_t RS = 16, RP = 16 / NA;  // rows a register tile of S; of P.V (16 accumulators)
  TORCH_CHECK(num_kv_heads == 1, "prefill tiles take one K/V head an item");
  static thread_local TileScratch<M> t;
  const int64_t rows = it.rows * groups, padded = (rows + RS - 1) / RS * RS;
  t.acc.assign(padded * D, 0.f);
  t.m.assign(padded, -INFINITY);
  t.l.assign(padded, 0.f);
  t.corr.assign(padded, 1.f);
  t.p.assign(padded * PW, 0);
  t.seen.assign(padded, 0);
  t.len.assign(padded, 0);
  t.q.resize(padded);
  for (int64_t r = 0; r < padded; ++r) {  // padding rows read row 0's query and see nothing
    const int64_t at = r < rows ? r : 0;
    t.q[r] = reinterpret_cast<const typename M::QWord*>(q + (at / groups) * it.qs_b + (at % groups) * qs_h);
    if (r < rows) t.len[r] = it.lens[r / groups];
  }
  // the buffers through plain pointers: the intrinsics' stores may alias anything, so through
  // `t` every store would reload the vectors' data pointers (and the thread-local's address)
  float *const acc = t.acc.data(), *const m = t.m.data(), *const l = t.l.data(), *const corrs = t.corr.data();
  typename M::PWord* const probs = t.p.data();
  int64_t* const seen = t.seen.data();
  const int64_t* const row_len = t.len.data();
  const typename M::QWord* const* const queries = t.q.data();
  const C* kbase = static_cast<const C*>(it.k);
  const C* vbase = static_cast<const C*>(it.v);
  const __m512 vscale = _mm512_set1_ps(scale);
  M math;
  alignas(64) T kbuf[kInt8<C> ? kTileTokens * D : 1], vbuf[kInt8<C> ? kTileTokens * D : 1];
  for (int64_t first = 0; first < it.len; first += block_size) {
    const int64_t n = std::min(block_size, it.len - first);
    const int64_t block = it.table[first / block_size];
    for (int64_t j0 = 0; j0 < n; j0 += kTileTokens) {
      const int64_t c = std::min(kTileTokens, n - j0), pos = first + j0;
      const int64_t at = block * it.s_blk + j0 * it.s_tok;
      if constexpr (kInt8<C>) {
        dequantize_tile<T, D>(kbuf, kbase + at, it.s_tok, c);
        dequantize_tile<T, D>(vbuf, vbase + at, it.s_tok, c);
        math.load(kbuf, vbuf, D, c);
      } else {
        math.load(kbase + at, vbase + at, it.s_tok, c);
      }
      for (int64_t r = 0; r < rows; ++r) seen[r] = std::clamp<int64_t>(row_len[r] - pos, 0, c);
      // scores and the online softmax, RS rows at a time (their maxima and sums in one register)
      for (int64_t r0 = 0; r0 < padded; r0 += RS) {
        if (seen[std::min(r0 + RS, rows) - 1] == 0) {  // rows go by token: the tile's last sees most
          std::fill(corrs + r0, corrs + r0 + RS, 1.f);
          std::fill(probs + r0 * PW, probs + (r0 + RS) * PW, 0);
          continue;
        }
        __m512 s[RS];
        for (int64_t r = 0; r < RS; ++r) s[r] = _mm512_setzero_ps();
        math.template scores<RS>(s, queries + r0);
        __mmask16 sees[RS];
        for (int64_t r = 0; r < RS; ++r) {  // lanes past what the row sees: -inf
          const int64_t cnt = seen[r0 + r];
          sees[r] = cnt == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
          s[r] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), sees[r], s[r], vscale);
        }
        const __m512 old = _mm512_loadu_ps(m + r0);
        const __m512 peak = _mm512_max_ps(old, reduce16_max(s));  // lane r: row r0 + r's running max
        // a row that has seen nothing yet (padding) keeps corr 1 and m -inf
        const __mmask16 live = _mm512_cmp_ps_mask(peak, _mm512_set1_ps(-INFINITY), _CMP_GT_OQ);
        const __m512 corr = _mm512_mask_blend_ps(live, _mm512_set1_ps(1.f), exp16(_mm512_maskz_sub_ps(live, old, peak)));
        for (int64_t r = 0; r < RS; ++r) {
          const __m512 top = _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int32_t>(r)), peak);
          s[r] = _mm512_maskz_mov_ps(sees[r], exp16(_mm512_sub_ps(s[r], top)));
          M::store_p(probs + (r0 + r) * PW, s[r]);
        }
        _mm512_storeu_ps(l + r0, _mm512_fmadd_ps(_mm512_loadu_ps(l + r0), corr, reduce16(s)));
        _mm512_storeu_ps(m + r0, peak);
        _mm512_storeu_ps(corrs + r0, corr);
      }
      // acc = acc * corr + p . V, RP rows at a time
      for (int64_t r0 = 0; r0 < padded; r0 += RP) {
        bool any = false;
        for (int64_t r = r0; r < r0 + RP; ++r) any |= seen[r] > 0;
        if (!any) continue;
        __m512 a[RP][NA];
        for (int64_t r = 0; r < RP; ++r)
          for (int64_t k = 0; k < NA; ++k)
            a[r][k] = _mm512_mul_ps(_mm512_loadu_ps(acc + (r0 + r) * D + 16 * k), _mm512_set1_ps(corrs[r0 + r]));
        math.template pv<RP>(a, probs + r0 * PW);
        for (int64_t r = 0; r < RP; ++r)
          for (int64_t k = 0; k < NA; ++k) _mm512_storeu_ps(acc + (r0 + r) * D + 16 * k, a[r][k]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float row[D];
    const float inv = 1.f / l[r];
    for (int64_t k = 0; k < NA; ++k)
      for (int64_t j = 0; j < 16; ++j) row[M::dim_of(k, j)] = acc[r * D + 16 * k + j] * inv;
    T* dst = out + (r / groups) * it.os_b + (r % groups) * os_h;
    for (int64_t v = 0; v < D / 16; ++v) store16(dst + 16 * v, _mm512_loadu_ps(row + 16 * v));
  }
}

#endif  // __AVX512F__

#if defined(SCALELLM_AVX2)
// ---- AVX2 (no AVX-512): decode_heads_avx512's work items and sweeps, 8 lanes, D = 64 * n -----
//
// The AVX-512 kernel's work items (a whole request once every thread has four) and block sweeps,
// with 8-lane registers: a query head scores 8 K rows at a time (one accumulator per row, their
// lanes summed together by reduce8), and the P.V accumulators are 64 values (8 registers) of one
// query head at a time, so accumulators, a probability and a loaded row fit AVX2's 16 registers.
// The next block is prefetched as there. Either work item sums in the same order, so gives the
// same bits. bench/decode_kernel.py on the 2-core AVX2 EPYC (30 layers, 64 decodes of ~136 tokens,
// SmolLM2's heads, 2 threads, medians of two runs): 0.60-0.74 against decode_kernel's 0.86-1.18 ms
// a layer in bfloat16, 0.90-0.96 against 1.03-1.15 in float32 (docs/benchmarks.md).

// r[i] = the sum of a[i]'s 8 lanes, for 8 vectors at once (hadd within 128-bit halves, then the
// halves added).
inline __m256 reduce8(const __m256* a) {
  const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 b2 = _mm256_hadd_ps(a[4], a[5]), b3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3);  // [a0..a3 low | a0..a3 high]
  return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

inline __m256i lanes_below(int64_t m) {  // lanes 0 .. m - 1 all ones
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(m, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One query head (q * scale in float32), scoring 8 K rows `stride` elements apart: q . row_j for
// j < m, 0 beyond. Rows of T, or int8 rows (an int8 cache): each sum then times its row's scale
// (the float16 after the D values; the 8 converted together).
template <typename T, int64_t D>
struct QueryHead8 {
  alignas(32) float q[D];
  QueryHead8(const T* src, float scale) {
    for (int64_t d = 0; d < D; ++d) q[d] = to_float(src[d]) * scale;
  }
  template <typename R>
  __m256 scores8(const R* rows, int64_t stride, int64_t m) const {
    const __m256 sums = m == 8 ? rows8<8>(rows, stride) : rows8<0>(rows, stride, m);
    if constexpr (!kInt8<R>) {
      return sums;
    } else {
      alignas(16) uint16_t scales[8] = {};
      for (int64_t j = 0; j < std::min<int64_t>(m, 8); ++j) std::memcpy(&scales[j], rows + j * stride + D, sizeof(uint16_t));
      return _mm256_mul_ps(sums, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(scales))));
    }
  }
  // M = 8: a full tile (the row loop unrolled, the accumulators in registers); 0: m rows.
  template <int64_t M, typename R>
  __m256 rows8(const R* rows, int64_t stride, int64_t m = 8) const {
    const int64_t count = M > 0 ? M : m;
    __m256 acc[8];
    for (int64_t j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qd = _mm256_load_ps(q + d);
      for (int64_t j = 0; j < count; ++j) acc[j] = _mm256_fmadd_ps(qd, load8(rows + j * stride + d), acc[j]);
    }
    return reduce8(acc);
  }
};

// s[t] = e^(s[t] - max s) for t < len, in place; returns max s and their sum.
inline Softmax softmax_numerators8(float* s, int64_t len) {
  __m256 peak = _mm256_set1_ps(-INFINITY);
  for (int64_t t = 0; t < len; t += 8) {
    const __m256i m = lanes_below(len - t);
    peak = _mm256_max_ps(peak, _mm256_blendv_ps(peak, _mm256_maskload_ps(s + t, m), _mm256_castsi256_ps(m)));
  }
  const float largest = hmax8(peak);
  const __m256 top = _mm256_set1_ps(largest);
  __m256 total = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; t += 8) {
    const __m256i m = lanes_below(len - t);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(s + t, m), top)), _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(s + t, m, e);
    total = _mm256_add_ps(total, e);
  }
  return {largest, hsum8(total)};
}

// T: the query's and output's type; C: the cache's, T or int8 (rows W = D + 2 apart; a V row's
// scale multiplies its p).
template <typename T, int64_t D, typename C = T>
void decode_heads_avx2(const Item& it, int64_t num_kv_heads, const T* q, int64_t qs_h, T* out, int64_t os_h,
                       int64_t groups, int64_t block_size, float scale, float* scores, float* acc_buf) {
  constexpr int64_t W = kRowWidth<C, D>;
  const C* kbase = static_cast<const C*>(it.k);
  const C* vbase = static_cast<const C*>(it.v);
  // query head qi: row qi / nh, head qi % nh of that row, K/V head (qi % nh) / groups; its scores
  // at scores + qi * len, over that row's own context
  const int64_t len = it.len, nh = num_kv_heads * groups, num_heads = it.rows * nh;
  std::vector<QueryHead8<T, D>> heads;
  heads.reserve(num_heads);
  for (int64_t qi = 0; qi < num_heads; ++qi) heads.emplace_back(query_of(it, q, qs_h, nh, qi), scale);
  // The next block's K lines of these heads (row_lines per token row; V's in the P.V pass) are
  // prefetched a share per query head, between the heads' scores, into L2 as in the AVX-512
  // kernel (this kernel on the Zen 4 built without AVX-512: 20-23% less time than prefetcht0 at 8
  // and 64 decodes; not timed on an AVX2-only CPU). Written out here: the same loop in a lambda made the kernel ~35% slower
  // in bfloat16 (GCC 12, bench/decode_kernel.py).
  const int64_t row_lines = (num_kv_heads * W * static_cast<int64_t>(sizeof(C)) + 63) / 64;
  const int64_t lines = block_size * row_lines, per_head = (lines + num_heads - 1) / num_heads;
  const int64_t row_bytes = it.s_tok * static_cast<int64_t>(sizeof(C));
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  for (int64_t index = 0; index < num_blocks; ++index) {
    const int64_t first = index * block_size, n = std::min(block_size, len - first);
    const bool fetch = index + 1 < num_blocks;
    const char* knext = fetch ? reinterpret_cast<const char*>(kbase + it.table[index + 1] * it.s_blk) : nullptr;
    const C* block = kbase + it.table[index] * it.s_blk;
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      // query head qi = r * nh + g * groups + i: row r, K/V head g (no divisions in the loop)
      for (int64_t r = 0, qi = 0; r < it.rows; ++r) {
        // the tokens of this block and of this row from j0 on, 8 at most
        const int64_t m = std::min<int64_t>(8, std::min(n, it.lens[r] - first) - j0);
        for (int64_t g = 0; g < num_kv_heads; ++g)
          for (int64_t i = 0; i < groups; ++i, ++qi) {
            if (m > 0)
              _mm256_maskstore_ps(scores + qi * len + first + j0, lanes_below(m),
                                  heads[qi].scores8(block + g * W + j0 * it.s_tok, it.s_tok, m));
            if (fetch && j0 == 0)
              prefetch_lines(knext, row_bytes, row_lines, qi * per_head, std::min(lines, (qi + 1) * per_head));
          }
      }
    }
  }
  std::vector<Softmax> soft(num_heads);
  for (int64_t qi = 0; qi < num_heads; ++qi) soft[qi] = softmax_numerators8(scores + qi * len, it.lens[qi / nh]);
  std::fill(acc_buf, acc_buf + num_heads * D, 0.f);
  const int64_t per_row_head = (lines + nh - 1) / nh;
  for (int64_t first = 0; first < len; first += block_size) {
    const int64_t index = first / block_size;
    const C* block = vbase + it.table[index] * it.s_blk;
    // V's next block, a share per query head of the first row (row by row, as the AVX-512 kernel
    // does, was 5-12% slower in float32 here, built for AVX2 on the Zen 4)
    const C* vnext = index + 1 < num_blocks ? vbase + it.table[index + 1] * it.s_blk : nullptr;
    for (int64_t qi = 0; qi < num_heads; ++qi) {
      const int64_t n = std::min(block_size, it.lens[qi / nh] - first);
      if (vnext != nullptr && qi < nh)
        prefetch_lines(vnext, row_bytes, row_lines, qi * per_row_head, std::min(lines, (qi + 1) * per_row_head));
      const C* rows = block + (qi % nh / groups) * W;
      const float* p = scores + qi * len + first;
      for (int64_t c = 0; c < D && n > 0; c += 64) {
        float* a = acc_buf + qi * D + c;
        __m256 acc[8];
        for (int64_t v = 0; v < 8; ++v) acc[v] = _mm256_loadu_ps(a + 8 * v);
        for (int64_t j = 0; j < n; ++j) {
          float pv = p[j];  // int8: times V's row scale (its values times the scale: V)
          if constexpr (kInt8<C>) pv *= row_scale(rows + j * it.s_tok, D);
          const __m256 pj = _mm256_set1_ps(pv);
          for (int64_t v = 0; v < 8; ++v) acc[v] = _mm256_fmadd_ps(pj, load8(rows + j * it.s_tok + c + 8 * v), acc[v]);
        }
        for (int64_t v = 0; v < 8; ++v) _mm256_storeu_ps(a + 8 * v, acc[v]);
      }
    }
  }
  for (int64_t qi = 0; qi < num_heads; ++qi) {
    if (it.lens[qi / nh] <= 0) continue;  // a row with no tokens in this partition
    const __m256 inv = _mm256_set1_ps(1.f / soft[qi].sum);
    if (float* part = partial_of(it, qi / nh, qi % nh, D)) {
      part[0] = soft[qi].peak, part[1] = soft[qi].sum;
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(part + 2 + d, _mm256_mul_ps(_mm256_loadu_ps(acc_buf + qi * D + d), inv));
      continue;
    }
    T* dst = output_of(it, out, os_h, nh, qi);
    for (int64_t d = 0; d < D; d += 8) store8(dst + d, _mm256_mul_ps(_mm256_loadu_ps(acc_buf + qi * D + d), inv));
  }
}

#endif  // SCALELLM_AVX2

// The vectorized kernel this build has, for head size D (decode_items' `heads`), a query of T and
// a cache of C (T, or int8).
#if defined(__AVX512F__)
template <typename T, int64_t D, typename C = T>
constexpr auto kHeads = &decode_heads_avx512<T, D / 16, C>;
#elif defined(SCALELLM_AVX2)
template <typename T, int64_t D, typename C = T>
constexpr auto kHeads = &decode_heads_avx2<T, D, C>;
#endif

// paged_decode for a query (and output) of T and a cache of C (T, or int8).
template <typename T, typename C>
void decode_as(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
               const at::Tensor& lens, double scale) {
  const int64_t d = q.size(2);
#if defined(__AVX512F__) || defined(SCALELLM_AVX2)
  if (d == 64) return decode_items<T, 64, C>(kHeads<T, 64, C>, out, q, kv, tables, lens, scale);
  if (d == 128) return decode_items<T, 128, C>(kHeads<T, 128, C>, out, q, kv, tables, lens, scale);
#endif
  if (d == 64) return decode_kernel<T, 64, C>(out, q, kv, tables, lens, scale);
  if (d == 128) return decode_kernel<T, 128, C>(out, q, kv, tables, lens, scale);
  decode_kernel<T, 0, C>(out, q, kv, tables, lens, scale);
}

// Whether this build has prefill tiles for T: float32 with AVX-512, bfloat16 with AVX512-BF16.
template <typename T>
constexpr bool kTiles =
#if defined(__AVX512BF16__)
    true;
#elif defined(__AVX512F__)
    std::is_same_v<T, float>;
#else
    false;
#endif

// Whether paged_prefill runs chunks of this dtype and head size in tiles (prefill_tiles): float32
// with AVX-512, bfloat16 with AVX512-BF16; head sizes 64 and 128; over a cache of this dtype or int8.
bool prefill_tiles_for(bool bf16, int64_t head_dim) {
  return (bf16 ? kTiles<c10::BFloat16> : kTiles<float>) && (head_dim == 64 || head_dim == 128);
}

// paged_prefill's chunks for a query of T and a cache of C (T, or int8) through this build's
// vectorized kernels, head sizes 64 and 128: tiles (prefill_tiles_for), else the decode kernels'
// rows (kHeads). False where there is none: paged_prefill then runs the
// rows as decodes.
template <typename T, typename C>
bool prefill_as(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                const std::vector<int64_t>& lens, const std::vector<std::array<int64_t, 3>>& chunks, double scale) {
  const int64_t d = q.size(2);
  if (d != 64 && d != 128) return false;
#if defined(__AVX512F__)
  if constexpr (kTiles<T>) {
    d == 64 ? prefill_items<T, 64, kTilePiece, false, C>(&prefill_tiles<T, 64, C>, out, q, kv, tables, lens, chunks,
                                                         scale)
            : prefill_items<T, 128, kTilePiece, false, C>(&prefill_tiles<T, 128, C>, out, q, kv, tables, lens, chunks,
                                                          scale);
    return true;
  }
#endif
#if defined(__AVX512F__) || defined(SCALELLM_AVX2)
  d == 64 ? prefill_items<T, 64, kPrefillRows, true, C>(kHeads<T, 64, C>, out, q, kv, tables, lens, chunks, scale)
          : prefill_items<T, 128, kPrefillRows, true, C>(kHeads<T, 128, C>, out, q, kv, tables, lens, chunks, scale);
  return true;
#else
  return false;
#endif
}

// An int8 cache's row for a head's D values x (float32 or bfloat16): engine/kv_quant.py's
// quantize_rows, the same arithmetic, so the same bytes. scale = max |x| / 127 (at least float16's
// smallest normal, kMinScale) rounded to float16; q = x / scale rounded to the nearest integer
// (ties to even, as torch.round) and clamped to [-127, 127]; the scale after the D values.
constexpr float kMinScale = 6.103515625e-05f;  // torch.finfo(torch.float16).tiny
template <typename T>
void quantize_row(int8_t* dst, const T* x, int64_t d) {
  float peak = 0.f;
  for (int64_t i = 0; i < d; ++i) peak = std::max(peak, std::abs(to_float(x[i])));
  const c10::Half scale(std::max(peak / 127.f, kMinScale));
  const float s = static_cast<float>(scale);
  for (int64_t i = 0; i < d; ++i)
    dst[i] = static_cast<int8_t>(std::clamp(std::nearbyint(to_float(x[i]) / s), -127.f, 127.f));
  std::memcpy(dst + d, &scale, sizeof(scale));
}

}  // namespace

// What paged_decode and paged_prefill ask of their query, output and cache. A cache of the query's
// dtype holds rows of D values, an int8 cache rows of D + 2 (kRowWidth).
static void check_attention_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && kv.dim() == 5, "q/out [rows, Hq, D], kv [N, 2, bs, Hkv, D]");
  TORCH_CHECK(q.sizes() == out.sizes(), "q and out differ in shape");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && kv.stride(4) == 1, "head_dim must be contiguous");
  const bool int8 = kv.scalar_type() == at::kChar;
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && (int8 || kv.scalar_type() == q.scalar_type()),
              "dtype mismatch");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(q.size(1) % kv.size(3) == 0 && q.size(2) + (int8 ? 2 : 0) == kv.size(4), "head shapes do not match");
}

void paged_decode(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                  const at::Tensor& lens, double scale) {
  check_attention_args(out, q, kv);
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(tables.is_contiguous() && lens.is_contiguous(), "contiguous tables");
  TORCH_CHECK(tables.dim() == 2 && lens.dim() == 1 && tables.size(0) == q.size(0) && lens.size(0) == q.size(0),
              "a block table and a context length per row");
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= tables.size(1) * kv.size(2), "a context length outside its block table");
  const bool bf16 = q.scalar_type() == at::kBFloat16, int8 = kv.scalar_type() == at::kChar;
  if (int8) return bf16 ? decode_as<c10::BFloat16, int8_t>(out, q, kv, tables, lens, scale)
                        : decode_as<float, int8_t>(out, q, kv, tables, lens, scale);
  bf16 ? decode_as<c10::BFloat16, c10::BFloat16>(out, q, kv, tables, lens, scale)
       : decode_as<float, float>(out, q, kv, tables, lens, scale);
}

// The step's prefill chunks (bounds [S, 3]: start row in q, length, cached context; tables [S, W]:
// each chunk's block table) into the same rows of out; decode rows are not touched. K/V of the
// chunks must already be in the cache (write_kv). Where this build has no vectorized kernel, or
// for other head sizes, the rows go to decode_kernel with a table row each.
static void paged_prefill(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                   const at::Tensor& bounds, double scale) {
  check_attention_args(out, q, kv);
  TORCH_CHECK(tables.scalar_type() == at::kLong && bounds.scalar_type() == at::kLong, "int64 tables and bounds");
  TORCH_CHECK(tables.dim() == 2 && bounds.dim() == 2 && bounds.size(1) == 3 && tables.size(0) == bounds.size(0),
              "tables [S, W], bounds [S, 3]");
  TORCH_CHECK(tables.is_contiguous() && bounds.is_contiguous(), "contiguous tables and bounds");
  const int64_t* bnd = bounds.data_ptr<int64_t>();
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t rows = q.size(0), block_size = kv.size(2), width = tables.size(1);
  std::vector<std::array<int64_t, 3>> chunks;
  std::vector<int64_t> lens(rows, 0);
  int64_t first = rows;  // the first prefill row
  for (int64_t k = 0; k < bounds.size(0); ++k) {
    const int64_t start = bnd[3 * k], n = bnd[3 * k + 1], context = bnd[3 * k + 2];
    TORCH_CHECK(start >= 0 && n > 0 && start + n <= rows && context >= 0, "a chunk's rows out of range");
    const int64_t blocks = (context + n + block_size - 1) / block_size;
    TORCH_CHECK(blocks <= width, "a chunk's block table is too short for its context");
    for (int64_t i = 0; i < blocks; ++i)
      TORCH_CHECK(0 <= tab[k * width + i] && tab[k * width + i] < kv.size(0), "block id out of range");
    for (int64_t i = 0; i < n; ++i) lens[start + i] = context + i + 1;
    chunks.push_back({start, n, context});
    first = std::min(first, start);
  }
  if (chunks.empty()) return;
  const bool bf16 = q.scalar_type() == at::kBFloat16, int8 = kv.scalar_type() == at::kChar;
  if (int8 ? bf16 ? prefill_as<c10::BFloat16, int8_t>(out, q, kv, tables, lens, chunks, scale)
                  : prefill_as<float, int8_t>(out, q, kv, tables, lens, chunks, scale)
           : bf16 ? prefill_as<c10::BFloat16, c10::BFloat16>(out, q, kv, tables, lens, chunks, scale)
                  : prefill_as<float, float>(out, q, kv, tables, lens, chunks, scale))
    return;
  // rows [first, rows) as decodes: each its chunk's table (rows between chunks: one token of block 0)
  std::vector<int64_t> owner(rows - first, -1);
  for (int64_t k = 0; k < static_cast<int64_t>(chunks.size()); ++k)
    for (int64_t i = 0; i < chunks[k][1]; ++i) owner[chunks[k][0] + i - first] = k;
  at::Tensor row_tables = at::zeros({rows - first, width}, tables.options());
  at::Tensor row_lens = at::ones({rows - first}, tables.options());
  for (int64_t r = 0; r < rows - first; ++r)
    if (owner[r] >= 0) {
      std::memcpy(row_tables.data_ptr<int64_t>() + r * width, tab + owner[r] * width, width * sizeof(int64_t));
      row_lens.data_ptr<int64_t>()[r] = lens[first + r];
    }
  at::Tensor scratch = at::empty({rows - first, q.size(1), q.size(2)}, out.options());
  paged_decode(scratch, q.narrow(0, first, rows - first), kv, row_tables, row_lens, scale);
  for (int64_t r = 0; r < rows - first; ++r)
    if (owner[r] >= 0) out[first + r].copy_(scratch[r]);
}

// kv[slot_blocks[t], 0 and 1, slot_offsets[t]] = new_kv[t, 0 and 1]: the step's K and V rows into
// their cache slots ([Hkv, D] each, contiguous on both sides): one copy per row, or for an int8
// cache ([Hkv, D + 2] a slot) each head's row quantized (quantize_row).
void write_kv(const at::Tensor& kv, const at::Tensor& new_kv, const at::Tensor& slot_blocks,
              const at::Tensor& slot_offsets) {
  TORCH_CHECK(kv.dim() == 5 && new_kv.dim() == 4 && new_kv.size(1) == 2, "kv [N, 2, bs, Hkv, D], new_kv [T, 2, Hkv, D]");
  const bool int8 = kv.scalar_type() == at::kChar && new_kv.scalar_type() != at::kChar;
  TORCH_CHECK(int8 ? new_kv.scalar_type() == at::kFloat || new_kv.scalar_type() == at::kBFloat16
                   : kv.scalar_type() == new_kv.scalar_type(),
              "dtype mismatch");
  const int64_t head_dim = new_kv.size(3);
  TORCH_CHECK(new_kv.size(2) == kv.size(3) && head_dim + (int8 ? 2 : 0) == kv.size(4), "head shapes do not match");
  TORCH_CHECK(kv.stride(4) == 1 && kv.stride(3) == kv.size(4), "a cache slot's [Hkv, D] must be contiguous");
  TORCH_CHECK(new_kv.stride(3) == 1 && new_kv.stride(2) == new_kv.size(3), "a new row's [Hkv, D] must be contiguous");
  TORCH_CHECK(slot_blocks.scalar_type() == at::kLong && slot_offsets.scalar_type() == at::kLong, "int64 slots");
  TORCH_CHECK(slot_blocks.is_contiguous() && slot_offsets.is_contiguous(), "contiguous slots");
  const int64_t tokens = new_kv.size(0), blocks = kv.size(0), block_size = kv.size(2), heads = kv.size(3);
  TORCH_CHECK(slot_blocks.numel() == tokens && slot_offsets.numel() == tokens, "one slot per token");
  const int64_t* blk = slot_blocks.data_ptr<int64_t>();
  const int64_t* off = slot_offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(0 <= blk[t] && blk[t] < blocks && 0 <= off[t] && off[t] < block_size, "slot out of range");
  const auto slot = [&](int64_t t, int64_t s) { return blk[t] * kv.stride(0) + s * kv.stride(1) + off[t] * kv.stride(2); };
  if (int8) {
    int8_t* dst = kv.data_ptr<int8_t>();
    const auto quantize = [&](const auto* src) {
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t s = 0; s < 2; ++s)
          for (int64_t h = 0; h < heads; ++h)
            quantize_row(dst + slot(t, s) + h * kv.stride(3),
                         src + t * new_kv.stride(0) + s * new_kv.stride(1) + h * head_dim, head_dim);
    };
    new_kv.scalar_type() == at::kBFloat16 ? quantize(new_kv.data_ptr<c10::BFloat16>())
                                          : quantize(new_kv.data_ptr<float>());
    return;
  }
  const int64_t es = kv.element_size(), bytes = heads * head_dim * es;
  char* dst = static_cast<char*>(kv.data_ptr());
  const char* src = static_cast<const char*>(new_kv.data_ptr());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t s = 0; s < 2; ++s)
      std::memcpy(dst + slot(t, s) * es, src + (t * new_kv.stride(0) + s * new_kv.stride(1)) * es, bytes);
}

}  // namespace scalellm

TORCH_LIBRARY(scalellm_cpu, m) {
  m.def("paged_decode(Tensor(a!) out, Tensor q, Tensor kv, Tensor block_tables, Tensor context_lens, float scale) -> ()");
  m.def("paged_prefill(Tensor(a!) out, Tensor q, Tensor kv, Tensor chunk_tables, Tensor chunk_bounds, float scale) -> ()");
  m.def("prefill_tiles(bool bfloat16, int head_dim) -> bool", &scalellm::prefill_tiles_for);
  m.def("write_kv(Tensor(a!) kv, Tensor new_kv, Tensor slot_blocks, Tensor slot_offsets) -> ()");
  m.impl("paged_decode", c10::DispatchKey::CPU, scalellm::paged_decode);
  m.impl("paged_prefill", c10::DispatchKey::CPU, scalellm::paged_prefill);
  m.impl("write_kv", c10::DispatchKey::CPU, scalellm::write_kv);
}
