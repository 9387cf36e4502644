#!/usr/bin/env bash
# One device-tool call's worth of issue #7 quantized-kernel measurements on a CUDA machine, run from the repository
# root with no install (PYTHONPATH over packages/*/src). Each stage has its own time limit and log under $OUT.
# Stages to run: the arguments (default: all, in this order).
#   tests     the W4A16 / W8A8 kernel tests (bf16, fp16) and the quantized model path on CUDA (AWQ, GPTQ, W8A8)
#   awq       batch-1 decode, 128 in / 256 out, dummy Llama-3-8B in AWQ w4g128, with a profile of the decode steps
#   bf16      the same model in bf16 (the baseline the AWQ figure is compared with)
#   sweep     launch shapes of the W4A16 kernels at the 8B shapes against cuBLAS bf16 (benchmarks/w4a16.py); the
#             fastest ones go to $OUT/w4a16_tuning.json, which the awq stage then runs with (run sweep first)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | tr '\n' ':')
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
stages=${*:-sweep awq bf16 tests}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "commit $commit (+ working tree), $(date -u)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  grep -E '^\{|lm-torch:|passed|failed|error|Error|max \|logit' "$OUT/$name.log" | tail -n 40 | tee -a "$OUT/summary.txt"
}

LATENCY="--load-format dummy --input-len 128 --output-len 256 --num-iters 2"
for stage in $stages; do
  case $stage in
    tests) run tests ${TESTS_LIMIT:-130} python3 -m pytest -q -s -m gpu -p no:cacheprovider --timeout 100 \
      tests/lm_torch/kernels/test_w4a16.py tests/lm_torch/kernels/test_w8a8.py tests/lm_torch/test_quant_layers.py ;;
    awq) [ -f "$OUT/w4a16_tuning.json" ] && export LM_TORCH_W4A16_TUNING="$OUT/w4a16_tuning.json"  # the sweep's
      run awq ${AWQ_LIMIT:-120} python3 benchmarks/latency.py --model benchmarks/configs/llama3-8b-awq $LATENCY \
      --profile ;;
    bf16) run bf16 ${BF16_LIMIT:-90} python3 benchmarks/latency.py --model benchmarks/configs/llama3-8b $LATENCY ;;
    sweep) run sweep ${SWEEP_LIMIT:-130} python3 benchmarks/w4a16.py --quick --rows 1,16,2048 \
      --write-tuning "$OUT/w4a16_tuning.json" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
