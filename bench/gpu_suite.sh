#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one go (the device tool's machines keep
# nothing between calls). Needs: the repo, Python with torch+CUDA and transformers, the project's
# other dependencies importable (PYTHONPATH or installed), and two model folders; bench/gpu_prep.sh
# prepares the missing wheels and a SIDE folder here and prints the device command that uses them:
#   SIDE   a model folder's config and tokenizer files (bench/random_model.py gives it random weights)
#   TINY   the tiny bench model (bench/gateway_overhead.py --model tiny builds it)
#   (moe: a random Mixtral-shaped model with SIDE's vocabulary, bench/random_model.py --moe)
#   (roofline: needs neither: bench/decode_roofline.py draws an 8B-shaped Llama's bf16 weights on the
#    GPU and reports decode ms/step, tok/s, HBM roofline fraction and launches per step at batch 1,
#    16, 64, 256, with decode CUDA graphs off and on, steps back to back as the engine runs them
#    with and without async scheduling, and a 2k-token prefill against the measured matmul peak;
#    OUTDIR/roofline.json)
# throughput: the offline engine against transformers, and the engine with async scheduling
#   beside it (same greedy outputs checked)
# exact: greedy output equal to transformers on CUDA (decode CUDA graphs on, the engine's default
#   there, for dense models), and tests/unit/test_cuda_graphs.py: captured graphs against eager
#   steps (logits, the cache outside the step's slots untouched, greedy tokens through the engine),
#   and the compiled Triton kernels against torch: tests/unit/test_ops_triton.py's fused layer ops
#   and the paged-decode and varlen prefill kernels at 8B's head shape (test_attention_triton.py),
#   in float32, bfloat16 and float16 (their interpreted CPU variants are CI's: the machine's older
#   Triton interpreter cannot run the kernels' loops over a loaded bound); async scheduling's events
#   equal the synchronous engine's with graphs on, and its forward passes and sampling never
#   synchronize with the GPU (tests with the demo tokenizer take it from SIDE)
# speculative: prompt-lookup drafts (k = 2, 4) against none on the random model in bfloat16, at 1,
#   16 and 64 requests with the CUDA rows budget (64), decode graphs on: tok/s, drafts accepted,
#   and how many outputs differ from k = 0's (several rows a step may take other matmul kernels
#   than one; OUTDIR/speculative.json)
# prefill: the Triton varlen prefill kernel (one launch for a step's chunks) against SDPA chunk by
#   chunk, at 8B's head shape in bfloat16 (bench/prefill_attention.py; OUTDIR/prefill.json)
# Stages (any subset, in order): env exact parity throughput backends profile gateway gateway-paired moe
#   roofline speculative prefill
#   bash bench/gpu_suite.sh SIDE TINY OUTDIR [STAGE...]
set -uo pipefail
side=$1 tiny=$2 out=$3
shift 3
stages=${*:-env exact parity throughput backends profile gateway gateway-paired moe roofline speculative prefill}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rand=/tmp/scalellm-random-$(basename "$side")
moe=/tmp/scalellm-random-moe-$(basename "$side")
# Worker, gateway and client each on their own cores: what the 2-core VM cannot give.
pin="0,1,2,3:4,5,6,7:$(seq -s, 8 $(($(nproc) - 1)))"

stage() {  # name, time limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v -E "Loading weights|Writing model"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

for s in $stages; do
  case $s in
    env)
      stage env 60 bash -c 'nvidia-smi -L; nproc; python3 -c "import torch, transformers, grpc; print(torch.__version__, torch.version.cuda, transformers.__version__, grpc.__version__, torch.cuda.get_device_name())"' ;;
    exact)
      stage exact 300 env SCALELLM_TEST_DEVICE=cuda SCALELLM_TEST_TOKENIZER_DIR="$side" python3 -m pytest -q -p no:cacheprovider \
        tests/unit/test_engine_exact.py tests/unit/test_cuda_graphs.py tests/unit/test_ops_triton.py \
        tests/unit/test_attention_triton.py::test_the_compiled_kernel_on_cuda_equals_torch_sdpa_at_an_8b_shape \
        tests/unit/test_attention_triton.py::test_the_compiled_prefill_kernel_on_cuda_equals_torch_sdpa_at_an_8b_shape \
        tests/unit/test_attention_triton.py::test_write_kv_puts_each_token_in_its_slot_as_indexing_does \
        tests/unit/test_attention_flash.py tests/unit/test_async_scheduling.py \
        -k "not demo and not cpu" ;;
    parity)
      [ -f "$rand/model.safetensors" ] || python3 bench/random_model.py "$side" "$rand" >/dev/null
      stage parity-float32 120 python3 bench/greedy_parity.py --model "$rand" --dtype float32
      stage parity-bfloat16 120 python3 bench/greedy_parity.py --model "$rand" --dtype bfloat16 ;;
    throughput)
      [ -f "$rand/model.safetensors" ] || python3 bench/random_model.py "$side" "$rand" >/dev/null
      stage throughput 300 python3 bench/engine_throughput.py --model "$rand" --device cuda \
        --num-requests 64 256 --repeats 3 --hf-repeats 1 --async-scheduling --out "$out/throughput.json" ;;
    backends)
      [ -f "$rand/model.safetensors" ] || python3 bench/random_model.py "$side" "$rand" >/dev/null
      stage backends 270 python3 bench/sdpa_backends.py --model "$rand" \
        --backends default ;;
    profile)
      [ -f "$rand/model.safetensors" ] || python3 bench/random_model.py "$side" "$rand" >/dev/null
      stage profile 170 python3 bench/step_profile.py --model "$rand" --batch 1 64 256 --steps 20 ;;
    gateway)
      stage gateway-steady 280 python3 bench/gateway_overhead.py --model "$tiny" --mode steady \
        --concurrency 1 8 32 64 --rounds 2 --pin "$pin" --worker-args "--num-kv-blocks 4096" \
        --json "$out/gateway-steady.json" ;;
    gateway-paired)
      stage gateway-paired 200 python3 bench/gateway_overhead.py --model "$tiny" --mode paired \
        --concurrency 64 --rounds 3 --paths direct gateway-grpc gateway-http --pin "$pin" \
        --worker-args "--num-kv-blocks 4096" --json "$out/gateway-paired.json" ;;
    moe)
      [ -f "$moe/model.safetensors" ] || python3 bench/random_model.py "$side" "$moe" --moe >/dev/null
      stage moe-parity-float32 150 python3 bench/greedy_parity.py --model "$moe" --dtype float32 \
        --prompts 8 --max-tokens 32
      stage moe-throughput 300 python3 bench/engine_throughput.py --model "$moe" --device cuda \
        --num-requests 64 256 --repeats 3 --hf-repeats 1 --out "$out/moe-throughput.json" ;;
    roofline)
      stage roofline 360 python3 bench/decode_roofline.py --shape 8b --device cuda \
        --batch 1 16 64 256 --context 512 --steps 20 --prefill 2048 --graphs off on \
        --json "$out/roofline.json" ;;
    speculative)
      [ -f "$rand/model.safetensors" ] || python3 bench/random_model.py "$side" "$rand" >/dev/null
      stage speculative 240 python3 bench/speculative.py --model "$rand" --device cuda --dtype bfloat16 \
        --k 0 2 4 --batch 1 16 64 --max-rows 64 --kv-blocks 4096 --repeats 2 --tolerate-mismatch \
        --json "$out/speculative.json" ;;
    prefill)
      stage prefill 120 python3 bench/prefill_attention.py --device cuda --shape 8b --dtype bfloat16 \
        --repeats 20 --json "$out/prefill.json" ;;
    *) echo "unknown stage $s" ;;
  esac
done
