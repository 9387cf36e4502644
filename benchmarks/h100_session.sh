#!/usr/bin/env bash
# Issue #6's GPU measurements and tests as stages of one command on a CUDA machine, run from the repository root
# with no install (PYTHONPATH over packages/*/src). Each stage has its own time limit and log under $OUT, so one
# that hangs or fails does not take the others with it. Stages to run: the arguments (default: all, in this order).
#   tests       every GPU test: the engine's GPU path, the model families, the kernels (bf16 and fp16)
#   latency     batch-1 decode, 128 in / 256 out, dummy Llama-3-8B, with a profile of the decode steps
#   latency0    the same without programmatic dependent launch (LM_TORCH_PDL=0), no profile
#   eager       the same with eager_mode (no CUDA graphs)
#   latency256  256 requests together, 200 in / 64 out, with the profile's per-kernel times (the 256-row steps)
#   tput200     ShareGPT lengths, 200 prompts at concurrency 256
#   tput1000    ShareGPT lengths, all 1000 prompts at concurrency 256 (LM_TORCH_ZERO_PADDING=0: the steps'
#               padding rows keep token 0's embedding, as before 7d73613)
#   tput1000q8  the same with the int8 KV cache (quant_policy 8)
#   tput1000e   tput1000 once per engine config in $ENGINE_CONFIGS ('|'-separated JSON objects), as tput1000e1, e2, ...
#   tput1000p   tput1000 under the torch profiler (PDL off, so kernel times exclude PDL waits) with a step trace
#   tput1000t   tput1000 with sampling (temperature 0.8, top-k 50: no host sync); tput1000tp: temperature 0.8 and
#               top-p 0.95 (one host sync per step, top-p's fallback check)
#   tput1000s   tput1000 with the graphs' decode split plan LM_TORCH_DECODE_SPLITS=$DECODE_SPLITS (default 4:256)
#   ltests      lm-lite on CUDA, the quantized layers and the KV-cache quantization through the engine
#   alltests    every GPU test of the repository (engine, families, kernels, KV quantization, quantized layers,
#               lm-lite on CUDA) in $PYTEST_WORKERS (default 12) pytest-xdist processes sharing the GPU;
#               alltestsk: the same with the gemm stage's tuning table; gtestsk: with it, the GEMM and decode
#               attention kernel tests and the engine's GPU tests only
#   ktests      the GPU kernel tests of the attention and W4A16 kernels only (a quick check after kernel changes)
#   ragged      decode attention on the context lengths of real throughput steps (benchmarks/decode_ragged.py), bf16,
#               int8 and int4 caches; raggedsweep: the int8 cache through every launch shape and conversion;
#               raggedsweep0: the bf16 cache's launch shapes at 128 and 256 decodes (the ShareGPT run's full steps);
#               splitsweep: split counts x split_tokens at batches 16-256, bf16 and int8; raggedtune: the fastest
#               plan (launch shape, split-K, order) of every graph bucket, bf16, written to $OUT/decode_tuning.json,
#               which tput1000d (tput1000 with it) and dtests (the engine, family and attention GPU tests with
#               it) then run with (raggedtune first)
#   gemv        batch-1 linear layers: cuBLAS(Lt) against the Triton GEMV candidate (benchmarks/gemv.py)
#   gemmpower   the 32 layers' linear layers at 256 rows at the power limit, with random, copied, zero padding rows
#               (benchmarks/gemm_power.py)
#   gemm        linear layers at 2-256 rows: cuBLASLt against transposed cuBLAS and the Triton skinny and tiled GEMMs'
#               launch shapes; the fastest extend a copy of the committed table in $OUT/gemm_tuning.json, which
#               tput1000k (tput1000 with it) then runs with (gemm first)
# Issue #7's quantized kernels (not in the default list):
#   sweep       W4A16 launch shapes at the 8B shapes against cuBLAS bf16 (benchmarks/w4a16.py; rows $SWEEP_ROWS, default
#               1,16,2048); the fastest go to
#               $OUT/w4a16_tuning.json, which the awq stage then runs with (run sweep first)
#   awq         batch-1 decode as `latency`, dummy Llama-3-8B in AWQ w4g128 (compare with `latency` in the same call)
#   awq0        the awq stage without programmatic dependent launch (LM_TORCH_PDL=0), no profile
#   qtests      the W4A16 / W8A8 kernel tests and the quantized model path on CUDA (AWQ, GPTQ, W8A8), the KV-cache
#               quantization tests, lm-lite on CUDA
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | tr '\n' ':')
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
MODEL="--model benchmarks/configs/llama3-8b --load-format dummy"
stages=${*:-latency tput1000 tests eager gemv}
# The device machine may hold an older .git than the working tree it was sent: pass COMMIT=<hash> to record the right one.
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{
  echo "commit $commit (+ working tree), $(date -u)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  local start=$SECONDS
  # The card's clocks, power and slow-down reasons every 0.5 s while the stage runs (one summary line after it).
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader,nounits -lms 500 >"$OUT/.smi.csv" 2>/dev/null &
  local smi=$!
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  echo "=== $name rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  awk -F', *' '$1 ~ /^[0-9]+$/ { n++; c += $1; if (!lo || $1 < lo) lo = $1; if ($1 > hi) hi = $1; p += $3
    if ($3 > pm) pm = $3; if ($4 > t) t = $4; r[$5]++ }
    END { if (n) { printf "gpu: SM clock min %d / mean %d / max %d MHz, power mean %.0f / max %.0f W, %d C max,", \
      lo, c / n, hi, p / n, pm, t; for (k in r) printf " reasons %s x%d", k, r[k]; print "" } }' \
    "$OUT/.smi.csv" | tee -a "$OUT/summary.txt" "$OUT/$name.log"
  sed 's/^/smi: /' "$OUT/.smi.csv" >>"$OUT/$name.log"  # every sample, for the clocks over the stage
  rm -f "$OUT/.smi.csv"
  grep -E '^\{|lm-torch:|passed|failed|error|Error' "$OUT/$name.log" | tail -n 25 | tee -a "$OUT/summary.txt"
}

# The ShareGPT workload of issue #6: all 1000 prompts at concurrency 256 ($MODEL split into its words on purpose).
SHAREGPT=(python3 benchmarks/throughput.py $MODEL --num-prompts 1000 --max-output-len 0 --concurrency 256)
ALLTESTS=(python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 150 -n "${PYTEST_WORKERS:-12}"
  tests/lm_torch/test_gpu_engine.py tests/lm_torch/test_model_families.py tests/lm_torch/kernels
  tests/lm_torch/test_quant_layers.py tests/lm_torch/test_kv_quant.py tests/lm_lite/test_gpu.py)

for stage in $stages; do
  case $stage in
    tests) run tests 240 python3 -m pytest -q -s -m gpu -p no:cacheprovider --timeout 120 \
      tests/lm_torch/test_gpu_engine.py tests/lm_torch/test_model_families.py tests/lm_torch/kernels ;;
    latency) run latency 130 python3 benchmarks/latency.py $MODEL --input-len 128 --output-len 256 \
      --num-iters 3 --profile ;;
    latency0) LM_TORCH_PDL=0 run latency0 130 python3 benchmarks/latency.py $MODEL --input-len 128 --output-len 256 \
      --num-iters 3 ;;
    latency256) run latency256 200 python3 benchmarks/latency.py $MODEL --batch-size 256 --input-len 200 \
      --output-len 64 --num-iters 2 --profile ;;
    eager) run eager 120 python3 benchmarks/latency.py $MODEL --input-len 128 --output-len 256 \
      --num-iters 2 --engine-config '{"eager_mode": true}' ;;
    tput200) run tput200 170 python3 benchmarks/throughput.py $MODEL --num-prompts 200 --max-output-len 0 \
      --concurrency 256 ;;
    tput1000) run tput1000 200 "${SHAREGPT[@]}" ;;
    tput1000t) run tput1000t 200 "${SHAREGPT[@]}" --sampling '{"do_sample": true, "temperature": 0.8, "top_k": 50}' ;;
    tput1000tp) run tput1000tp 200 "${SHAREGPT[@]}" --sampling '{"do_sample": true, "temperature": 0.8, "top_p": 0.95}' ;;
    tput1000s) LM_TORCH_DECODE_SPLITS=${DECODE_SPLITS:-4:256} run tput1000s 200 "${SHAREGPT[@]}" ;;
    tput1000p) LM_TORCH_PDL=0 run tput1000p 220 "${SHAREGPT[@]}" --profile --step-trace "$OUT/step_trace.json" ;;
    tput1000q8) run tput1000q8 200 "${SHAREGPT[@]}" --engine-config '{"quant_policy": 8}' ;;
    tput1000e) IFS='|' read -ra configs <<<"${ENGINE_CONFIGS:-}"
      for i in "${!configs[@]}"; do run "tput1000e$((i + 1))" 200 "${SHAREGPT[@]}" --engine-config "${configs[$i]}"; done ;;
    alltests) run alltests 300 "${ALLTESTS[@]}" ;;
    alltestsk) LM_TORCH_GEMM_TUNING="$OUT/gemm_tuning.json" run alltestsk 300 "${ALLTESTS[@]}" ;;
    gtestsk) LM_TORCH_GEMM_TUNING="$OUT/gemm_tuning.json" run gtestsk 150 python3 -m pytest -q -m gpu \
      -p no:cacheprovider --timeout 100 -n 8 tests/lm_torch/kernels/test_gemm.py tests/lm_torch/kernels/test_gemv.py \
      tests/lm_torch/kernels/test_decode_attention.py tests/lm_torch/test_gpu_engine.py ;;
    ktests) run ktests 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 100 \
      tests/lm_torch/kernels/test_decode_attention.py tests/lm_torch/kernels/test_triton_backend.py \
      tests/lm_torch/kernels/test_kv_quant_kernels.py tests/lm_torch/kernels/test_w4a16.py ;;
    ltests) run ltests 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 100 \
      tests/lm_lite/test_gpu.py tests/lm_torch/test_quant_layers.py tests/lm_torch/test_kv_quant.py ;;
    ragged) run ragged 120 python3 benchmarks/decode_ragged.py --kv-quant 0 8 4 ;;
    raggedsweep0) run raggedsweep0 300 python3 benchmarks/decode_ragged.py --kv-quant 0 --batches 128 256 --sweep ;;
    raggedsweep) run raggedsweep 330 python3 benchmarks/decode_ragged.py --kv-quant 8 --sweep ;;
    raggedtune) run raggedtune 330 python3 benchmarks/decode_ragged.py --tune "$OUT/decode_tuning.json" ;;
    tput1000d) LM_TORCH_DECODE_TUNING="$OUT/decode_tuning.json" run tput1000d 200 "${SHAREGPT[@]}" ;;
    dtests) LM_TORCH_DECODE_TUNING="$OUT/decode_tuning.json" run dtests 150 python3 -m pytest -q -m gpu \
      -p no:cacheprovider --timeout 100 -n 8 tests/lm_torch/test_gpu_engine.py tests/lm_torch/test_model_families.py \
      tests/lm_torch/kernels/test_triton_backend.py tests/lm_torch/kernels/test_decode_attention.py ;;
    splitsweep) run splitsweep 200 python3 benchmarks/decode_ragged.py --kv-quant 0 8 --batches 16 32 64 128 256 \
      --splits-sweep ;;
    gemv) run gemv 120 python3 benchmarks/gemv.py ;;
    gemmpower) run gemmpower 120 python3 benchmarks/gemm_power.py ;;
    gemm) cp packages/lm-torch/src/lm_torch/kernels/gemm_tuning.json "$OUT/gemm_tuning.json"
      run gemm 420 python3 benchmarks/gemm.py --rows ${GEMM_ROWS:-2 16 64 128 192 256} --kernels ${GEMM_KERNELS:-cublas_t skinny tiled tma} \
      --write-tuning "$OUT/gemm_tuning.json" ;;
    tput1000k) LM_TORCH_GEMM_TUNING="$OUT/gemm_tuning.json" run tput1000k 200 "${SHAREGPT[@]}" ;;
    sweep) run sweep 240 python3 benchmarks/w4a16.py --quick --rows "${SWEEP_ROWS:-1,16,2048}" --write-tuning "$OUT/w4a16_tuning.json" ;;
    awq) [ -f "$OUT/w4a16_tuning.json" ] && export LM_TORCH_W4A16_TUNING="$OUT/w4a16_tuning.json"  # the sweep's
      run awq 120 python3 benchmarks/latency.py --model benchmarks/configs/llama3-8b-awq --load-format dummy \
      --input-len 128 --output-len 256 --num-iters 2 --profile ;;
    awq0) LM_TORCH_PDL=0 run awq0 120 python3 benchmarks/latency.py --model benchmarks/configs/llama3-8b-awq \
      --load-format dummy --input-len 128 --output-len 256 --num-iters 2 ;;
    qtests) run qtests 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 100 \
      tests/lm_torch/kernels/test_w4a16.py tests/lm_torch/kernels/test_w8a8.py tests/lm_torch/test_quant_layers.py \
      tests/lm_torch/kernels/test_kv_quant_kernels.py tests/lm_torch/test_kv_quant.py tests/lm_lite/test_gpu.py ;;
    *) echo "unknown stage $stage" ;;
  esac
done
