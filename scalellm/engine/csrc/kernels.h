// The kernels' entry points (each file's torch op), declared for decode_stack.cpp, which calls
// them in a decode step's order without going back to Python between them, and the row helpers
// one kernel file shares with another. Their contracts are in the files that define them.
//
// Hidden: not exported from the built library. A benchmark loads an older build of a kernel
// beside this one (bench/decode_kernel.py, bench/w8a8_kernel.py); with default visibility the
// dynamic linker would bind its registration of scalellm::paged_decode to the first library's.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <optional>

#pragma GCC visibility push(hidden)
namespace scalellm {

// argmax.cpp (sample.cpp's and logprobs.cpp's peak)
int64_t argmax_row(const float* x, int64_t n);
int64_t argmax_row(const c10::BFloat16* x, int64_t n);

// sample.cpp (logprobs.cpp's log-sum-exp takes it): e[i] = exp((x[i] - peak) * inv_t), 0 where
// x[i] is -inf; returns their sum
float exp_sum(const float* x, int64_t n, float peak, float inv_t, float* e);
float exp_sum(const c10::BFloat16* x, int64_t n, float peak, float inv_t, float* e);

// fused_ops.cpp
void rms_norm(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& residual,
              const at::Tensor& weight, double eps);
void silu_mul(const at::Tensor& out, const at::Tensor& gate_up);
void rope_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// linear_panels.cpp
void linear_panels(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                   const std::optional<at::Tensor>& bias);

// quant_ops.cpp
void w8a8_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scales,
                 const std::optional<at::Tensor>& bias, int64_t requested);

// paged_decode.cpp
void paged_decode(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                  const at::Tensor& lens, double scale);
void write_kv(const at::Tensor& kv, const at::Tensor& new_kv, const at::Tensor& slot_blocks,
              const at::Tensor& slot_offsets);

}  // namespace scalellm
#pragma GCC visibility pop
