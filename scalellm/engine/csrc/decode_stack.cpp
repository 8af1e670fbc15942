// A step of decodes through every decoder layer in one call (CPU): the kernels that
// models/llama.py's layer loop calls for such a step, in the same order on the same values, so the
// same bits, without going back to Python and the dispatcher between them. That trip cost ~60 us
// a layer (module calls, op dispatch, a new tensor per output): one engine's one-stream step of the
// demo model, with and without it in turns, 11.2 against 8.1 ms on two Zen 4 cores
// (docs/benchmarks.md). models/decode_stack.py's CpuDecodeStack says which models and steps take it.
//
//   x [B, hidden]: the step's embeddings; each of the B rows is one decode (or a draft token)
//   for each layer l:
//     h   = rms_norm(x)                  (l = 0: residual = x)
//     h   = rms_norm(x + residual)       (l > 0: residual += x first)
//     qkv = h Wqkv^T (+ bias)            [B, Hq + 2 Hkv, D]
//     q, k = rms_norm per head (Qwen3's q/k norms, torch's op as the layer's TorchOps calls it)
//     rope on q and k in place
//     K, V of each row -> its cache slot (int8 cache: quantized); a = paged_decode(q, the layer's cache)
//     h   = rms_norm(a Wo^T + residual)  (residual += a Wo^T first)
//     x   = (silu(h Wg^T) * h Wu^T) Wd^T
//   returns the last layer's x; x (the embeddings) now holds the residual stream: the model's final
//   norm adds the two.
//
// The linear layers' weights are all of one kind (LinearKind): packed by pack_panels (our kernel:
// linear_panels), reordered for oneDNN (torch's mkldnn::_linear_pointwise: bfloat16 on AMX CPUs,
// PackedLinear) or int8 with a scale per output (w8a8_linear: W8A8Linear).
// Buffers are allocated once a step and reused by every layer (no op reads the buffer it writes);
// oneDNN's calls return their own.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rms_norm.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

#include "kernels.h"

namespace scalellm {
namespace {

// x W^T (+ bias) as PackedLinear computes it: the op it calls, through the dispatcher.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, w, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::optional<std::string>("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// The kinds of linear weights, as models/decode_stack.LinearKind numbers them.
enum LinearKind : int64_t { kPanels = 0, kOneDnn = 1, kW8A8 = 2 };

// x W^T (+ bias) for a weight of `kind` (W8A8: `scales` its per-output scales, `path` its kernel
// path): into `out`, or a new tensor from oneDNN.
at::Tensor linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor* scales,
                  const std::optional<at::Tensor>& bias, int64_t kind, int64_t path) {
  if (kind == kOneDnn) return onednn_linear(x, w, bias);
  if (kind == kW8A8) {
    w8a8_linear(out, x, w, *scales, bias, path);
    return out;
  }
  linear_panels(out, x, w, bias);
  return out;
}

at::Tensor decode_layers(
    const at::Tensor& x, at::TensorList input_norms, at::TensorList qkv, at::TensorList qkv_bias, at::TensorList o,
    at::TensorList q_norms, at::TensorList k_norms, at::TensorList post_norms, at::TensorList gate_up,
    at::TensorList down, at::TensorList scales, const at::Tensor& kv_cache,
    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slot_blocks, const at::Tensor& slot_offsets,
    const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t num_heads, int64_t intermediate,
    double eps, double scale, int64_t kind, int64_t w8a8_path) {
  const auto layers = static_cast<int64_t>(input_norms.size());
  TORCH_CHECK(static_cast<int64_t>(qkv.size()) == layers && static_cast<int64_t>(o.size()) == layers &&
                  static_cast<int64_t>(post_norms.size()) == layers &&
                  static_cast<int64_t>(gate_up.size()) == layers && static_cast<int64_t>(down.size()) == layers,
              "one weight of each kind per layer");
  TORCH_CHECK(qkv_bias.empty() || static_cast<int64_t>(qkv_bias.size()) == layers, "a qkv bias per layer, or none");
  TORCH_CHECK(kind == kPanels || kind == kOneDnn || kind == kW8A8, "unknown linear kind");
  TORCH_CHECK((kind == kW8A8) == !scales.empty(), "W8A8 weights, and only they, come with scales");
  TORCH_CHECK(scales.empty() || static_cast<int64_t>(scales.size()) == 4 * layers,
              "W8A8 scales: qkv, o, gate_up, down of each layer");
  TORCH_CHECK(q_norms.size() == k_norms.size() && (q_norms.empty() || static_cast<int64_t>(q_norms.size()) == layers),
              "q and k norms for every layer, or none");
  TORCH_CHECK(layers > 0 && kv_cache.dim() == 6 && kv_cache.size(1) == layers,
              "kv_cache [blocks, layers, 2, bs, Hkv, D] (D + 2 for int8)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x [B, hidden] contiguous");
  const int64_t rows = x.size(0), hidden = x.size(1);
  // an int8 cache's rows hold a float16 scale after the head's values (engine/kv_quant.py)
  const int64_t kv_heads = kv_cache.size(4), heads = num_heads + 2 * kv_heads;
  const int64_t head_dim = kv_cache.size(5) - (kv_cache.scalar_type() == at::kChar ? 2 : 0);
  auto buffer = [&](int64_t width) { return at::empty({rows, width}, x.options()); };
  const at::Tensor h = buffer(hidden), qkv_buffer = buffer(heads * head_dim), attn = buffer(num_heads * head_dim);
  const at::Tensor o_buffer = buffer(hidden), gu_buffer = buffer(2 * intermediate), act = buffer(intermediate);
  const at::Tensor mlp_buffer = buffer(hidden);
  const at::Tensor residual = x;  // layer 0's norm reads x; later ones add into it
  const at::Tensor attn_heads = attn.view({rows, num_heads, head_dim});
  at::Tensor mlp_out;
  for (int64_t l = 0; l < layers; ++l) {
    if (l == 0)
      rms_norm(h, x, std::nullopt, input_norms[0], eps);
    else
      rms_norm(h, mlp_out, residual, input_norms[l], eps);
    const auto bias = qkv_bias.empty() ? std::nullopt : std::optional<at::Tensor>(qkv_bias[l]);
    // this layer's W8A8 scales (unused for other kinds)
    const at::Tensor* sc = scales.empty() ? nullptr : &scales[4 * l];
    const at::Tensor all_heads =
        linear(qkv_buffer, h, qkv[l], sc, bias, kind, w8a8_path).view({rows, heads, head_dim});
    if (!q_norms.empty()) {  // Python: qkv[:, :hq] = q_norm(qkv[:, :hq]), the same for k
      const at::Tensor q = all_heads.narrow(1, 0, num_heads), k = all_heads.narrow(1, num_heads, kv_heads);
      q.copy_(at::rms_norm(q, {head_dim}, q_norms[l], eps));
      k.copy_(at::rms_norm(k, {head_dim}, k_norms[l], eps));
    }
    rope_(all_heads.narrow(1, 0, num_heads + kv_heads), cos, sin);  // q and k
    const at::Tensor kv = kv_cache.select(1, l);
    write_kv(kv, all_heads.narrow(1, num_heads, 2 * kv_heads).view({rows, 2, kv_heads, head_dim}), slot_blocks,
             slot_offsets);
    paged_decode(attn_heads, all_heads.narrow(1, 0, num_heads), kv, block_tables, context_lens, scale);
    const auto scale_of = [&](int64_t i) { return sc == nullptr ? nullptr : sc + i; };
    rms_norm(h, linear(o_buffer, attn, o[l], scale_of(1), std::nullopt, kind, w8a8_path), residual, post_norms[l], eps);
    const at::Tensor gu = linear(gu_buffer, h, gate_up[l], scale_of(2), std::nullopt, kind, w8a8_path);
    silu_mul(act, gu);
    mlp_out = linear(mlp_buffer, act, down[l], scale_of(3), std::nullopt, kind, w8a8_path);
  }
  return mlp_out;
}

}  // namespace
}  // namespace scalellm

TORCH_LIBRARY_FRAGMENT(scalellm_cpu, m) {
  m.def(
      "decode_layers(Tensor(a!) x, Tensor[] input_norms, Tensor[] qkv, Tensor[] qkv_bias, Tensor[] o, "
      "Tensor[] q_norms, Tensor[] k_norms, Tensor[] post_norms, Tensor[] gate_up, Tensor[] down, Tensor[] scales, "
      "Tensor(b!) kv_cache, Tensor cos, Tensor sin, "
      "Tensor slot_blocks, Tensor slot_offsets, Tensor block_tables, Tensor context_lens, int num_heads, "
      "int intermediate, float eps, float scale, int kind, int w8a8_path) -> Tensor");
  m.impl("decode_layers", c10::DispatchKey::CPU, scalellm::decode_layers);
  m.impl("decode_layers", c10::DispatchKey::MkldnnCPU, scalellm::decode_layers);  // oneDNN's weights
}
