// Logprobs (CPU): per row, the log-softmax of one token and the k largest log-softmax values
// with their token ids, from the model's logits as they are (float32 or bfloat16), in one call
// for the batch. engine/sampler.py's torch path (``logprob_tensors``) copies the rows to float32
// and writes the whole log-softmax before its gather and topk: 6 ms for 64 rows of SmolLM2's
// 49152 logits on 2 Zen 4 cores, 160-180 ms for a 1024-token prompt's prompt logprobs.
//
// Per row (argmax.cpp's row argmax for the peak, sample.cpp's exp pass for the sum):
//
//   peak        max_i x[i]
//   shift       peak + log(sum_i exp(x[i] - peak))
//   logprob(i)  x[i] - shift                             torch's log_softmax's form (its exp
//                                                        and sum differ in the last bits)
//   top k       the k largest x[i], largest first, ties in vocabulary order: a heap of k, the
//               row scanned 16 (AVX-512) or 8 (AVX2) values at a time against its smallest
//
// A row without a finite peak (a NaN, +inf, or every logit -inf) has NaN logprobs (torch's
// log_softmax gives NaN there too) and tokens 0..k-1 as its top ids.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "vec256.h"
#include "vec512.h"

namespace {

using Entry = std::pair<float, int64_t>;  // (logit, token id)

// a ranks above b: larger, or as large and earlier in the vocabulary
inline bool above(const Entry& a, const Entry& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); }

// top[0, k) = the k largest (x[i], i) of the row, largest first (k <= n, no NaN in x).
template <typename T>
void top_k(const T* x, int64_t n, int64_t k, std::vector<Entry>& top) {
  top.clear();
  for (int64_t i = 0; i < k; ++i) top.emplace_back(static_cast<float>(x[i]), i);
  std::make_heap(top.begin(), top.end(), above);  // front: the lowest-ranked of them
  float floor = top.front().first;
  // a later token enters only when larger than the lowest kept one (as large: it ranks below)
  auto offer = [&](int64_t i) {
    const float v = static_cast<float>(x[i]);
    if (!(v > floor)) return;
    std::pop_heap(top.begin(), top.end(), above);
    top.back() = {v, i};
    std::push_heap(top.begin(), top.end(), above);
    floor = top.front().first;
  };
  int64_t i = k;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __mmask16 hit = _mm512_cmp_ps_mask(load16(x + i), _mm512_set1_ps(floor), _CMP_GT_OQ);
    for (; hit; hit &= hit - 1) offer(i + __builtin_ctz(hit));
  }
#elif defined(SCALELLM_AVX2)
  for (; i + 8 <= n; i += 8) {
    int hit = _mm256_movemask_ps(_mm256_cmp_ps(load8(x + i), _mm256_set1_ps(floor), _CMP_GT_OQ));
    for (; hit; hit &= hit - 1) offer(i + __builtin_ctz(hit));
  }
#endif
  for (; i < n; ++i) offer(i);
  std::sort_heap(top.begin(), top.end(), above);  // ascending by `above`: the largest first
}

void logprob_rows(const at::Tensor& chosen, const at::Tensor& values, const at::Tensor& ids, const at::Tensor& x,
                  const at::Tensor& token_ids) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1, "x [N, V], V > 0, rows contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0), k = values.dim() == 2 ? values.size(1) : -1;
  TORCH_CHECK(k >= 0 && k <= n && values.size(0) == rows && values.scalar_type() == at::kFloat &&
                  values.is_contiguous(), "values [N, k] float32, k <= V");
  TORCH_CHECK(ids.sizes() == values.sizes() && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "ids [N, k] int64");
  TORCH_CHECK(chosen.dim() == 1 && chosen.size(0) == rows && chosen.scalar_type() == at::kFloat &&
                  chosen.is_contiguous(), "chosen [N] float32");
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.size(0) == rows && token_ids.scalar_type() == at::kLong &&
                  token_ids.is_contiguous(), "token_ids [N] int64");
  const int64_t* tok = token_ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(tok[r] >= 0 && tok[r] < n, "row ", r, ": token id out of range");
  float *lp = chosen.data_ptr<float>(), *val = values.data_ptr<float>();
  int64_t* top_ids = ids.data_ptr<int64_t>();
  auto run = [&](auto* base) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> e(n);
      std::vector<Entry> top;
      top.reserve(k);
      for (int64_t r = begin; r < end; ++r) {
        const auto* row = base + r * stride;
        const float peak = static_cast<float>(row[scalellm::argmax_row(row, n)]);
        const bool finite = std::isfinite(peak);
        // one subtraction a value, as torch's log_softmax does: the chosen token's logprob and
        // its entry among the top are the same number (-ffast-math could reassociate two)
        const float shift = finite ? peak + std::log(scalellm::exp_sum(row, n, peak, 1.f, e.data()))
                                   : std::numeric_limits<float>::quiet_NaN();
        auto logprob = [&](float v) { return v - shift; };
        lp[r] = logprob(static_cast<float>(row[tok[r]]));
        if (k == 0) continue;
        if (finite) {
          top_k(row, n, k, top);
        } else {
          top.clear();
          for (int64_t j = 0; j < k; ++j) top.emplace_back(static_cast<float>(row[j]), j);
        }
        for (int64_t j = 0; j < k; ++j) {
          val[r * k + j] = logprob(top[j].first);
          top_ids[r * k + j] = top[j].second;
        }
      }
    });
  };
  x.scalar_type() == at::kBFloat16 ? run(x.data_ptr<c10::BFloat16>()) : run(x.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def("logprob_rows(Tensor(a!) chosen, Tensor(b!) values, Tensor(c!) ids, Tensor x, Tensor token_ids) -> ()");
  m.impl("logprob_rows", c10::DispatchKey::CPU, logprob_rows);
}
