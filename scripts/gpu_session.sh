#!/usr/bin/env bash
# GPU tests, the GEMM kernel benchmark, the decode benchmarks (tables + JSON), as one device call
# per STEPS subset: tests alone took 5.3 minutes on an H200 without the int4 every-config
# cases and those 2 more (runs 49-50), so a full pass is three calls of at most 10 minutes:
# STEPS=tests, STEPS=kernels, then STEPS="decode default".
# Usage (repo root, on the CUDA machine): OUT=/some/dir [GGUF=model.gguf] [STEPS="tests kernels
# decode default"] [TESTS="pytest node ids, split on spaces"] [TESTS_K="a -k expression"]
# [KERNEL_ARGS="--sweep --shapes ..."] [KERNEL_LIMIT=seconds (240)] [DECODE_ARGS="--profile"]
# [TUNE_ARGS="--schemes int4 --rows 1"] [TUNE_LIMIT=seconds (540)] [DECODE_LIMIT=seconds (240)]
# scripts/gpu_session.sh
#   tests    pytest tests/gpu (kernels at real sizes, engine graphs vs eager, packed serving)
#   kernels  python3 -m kernels.bench_gpu            (W4A16/W8A16 vs bf16, Llama-3-8B shapes)
#   decode   python3 -m server.benchmarks.gpu_decode (8B shape: bf16/int8/int4 vs roofline and
#            transformers, batch 1 and 64)
#   default  the default model ($GGUF) through the engine, graphs on and off [$DEFAULT_ARGS:
#            --graph-costs for the device time of a step by batch and Q; --default-configs ...]
#   spec     n-gram speculation on vs off, the default model ($GGUF) through the engine in
#            bfloat16, dense then int4-packed weights [$SPEC_QUANTS="none int4"] [$SPEC_ARGS]
#            (python3 -m server.benchmarks.spec)
#   phases   where an engine step's time goes by step shape, host phases against the graph's
#            device time, the default model ($GGUF) in bfloat16 with n-gram drafts
#            (python3 -m server.benchmarks.phases) [$PHASES_ARGS]
#   prompts  steps that take in prompts through prompt graphs against eager ones
#            (python3 -m server.benchmarks.prompt_steps), $GGUF or a random model of its shape
#            [$PROMPTS_ARGS]
#   probe    python3 -m kernels.probe_loads (loads-only floor of the int4 GEMV's access pattern)
#   attention python3 -m kernels.bench_attention (decode attention by tile size and split
#            count, the default model's and the 8B's shapes) [$ATTENTION_ARGS]
#   tune     python3 -m kernels.tune_gpu [$TUNE_ARGS] (the device's GEMV table, into $OUT)
#   hybrid   hybrid KV cache vs full attention, the default model ($GGUF) in bfloat16:
#            perplexity, context per GiB, batch-1 decode at long context (run 149: ~90 s for 4 configs)
#            (python3 -m server.benchmarks.hybrid) [$HYBRID_ARGS]
#   drafter  trains a draft head for the default model ($GGUF) from 4 sampled answers to each
#            built-in training prompt (run 147: ~100 s), then `bench spec --speculative head`
#            with it in bfloat16 [$DRAFTER_ARGS]
#   verify   `bench spec --speculative head` with $HEAD (default: the `drafter` step's head),
#            verification steps launched ahead on, then off (--no-verify-ahead), in bfloat16
#            [$VERIFY_ARGS, e.g. "--batch-sizes 1"]
#   serve    the HTTP server on the default model ($GGUF) load-tested by `leapfrog bench serve`
#            at concurrencies 1, 16 and 64 [$SERVE_ARGS (server flags), $CONCURRENCIES,
#            $BENCH_ARGS] (scripts/gpu_serve.sh)
# The `gguf` package is not in the device image: a wheel under .whl/ (carried) is installed
# (scripts/gpu_env.sh, which ad-hoc commands source too).
set -uo pipefail
OUT="${OUT:-/tmp/leapfrog-gpu}"
STEPS="${STEPS:-tests kernels decode default}"
GGUF="${GGUF:-}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  echo "=== $name rc=$status"
  [ "$status" -eq 0 ] || rc=1
}
for s in $STEPS; do
  case $s in
    tests) step tests 540 python3 -m pytest -q -p no:cacheprovider --tb=short \
      ${TESTS_K:+-k "$TESTS_K"} ${TESTS:-tests/gpu} ;;
    kernels) step kernels "${KERNEL_LIMIT:-240}" python3 -m kernels.bench_gpu --json "$OUT/kernels.json" ${KERNEL_ARGS:-} ;;
    decode) step decode "${DECODE_LIMIT:-240}" python3 -m server.benchmarks.gpu_decode --json "$OUT/decode.json" \
      ${DECODE_ARGS:-} ;;
    default)
      if [ -n "$GGUF" ]; then
        step default 300 python3 -m server.benchmarks.gpu_decode --skip-8b --gguf "$GGUF" \
          --json "$OUT/default.json" ${DEFAULT_ARGS:-}
      else
        echo "=== default: skipped (no GGUF=...)"
      fi ;;
    spec)
      if [ -n "$GGUF" ]; then
        for q in ${SPEC_QUANTS:-none int4}; do
          step "spec_$q" 270 python3 -m server.benchmarks.spec "$GGUF" --dtype bfloat16 \
            --quantization "$q" --on-mismatch count --result-json "$OUT/spec_$q.json" ${SPEC_ARGS:-}
        done
      else
        echo "=== spec: skipped (no GGUF=...)"
      fi ;;
    phases)
      if [ -n "$GGUF" ]; then
        step phases 240 python3 -m server.benchmarks.phases "$GGUF" --dtype bfloat16 \
          --result-json "$OUT/phases.json" ${PHASES_ARGS:-}
      else
        echo "=== phases: skipped (no GGUF=...)"
      fi ;;
    hybrid)
      if [ -n "$GGUF" ]; then
        step hybrid 300 python3 -m server.benchmarks.hybrid "$GGUF" --device cuda \
          --dtype bfloat16 --result-json "$OUT/hybrid.json" ${HYBRID_ARGS:-}
      else
        echo "=== hybrid: skipped (no GGUF=...)"
      fi ;;
    drafter)
      if [ -n "$GGUF" ]; then
        step drafter_train 240 python3 -m server.cli train-drafter "$GGUF" --device cuda \
          --dtype bfloat16 -o "$OUT/head.safetensors" --answers-per-prompt 4 --temperature 0.7 \
          --max-num-seqs 64 --steps 3000 --batch-size 1024 --result-json "$OUT/drafter.json" \
          ${DRAFTER_ARGS:-}
        step drafter_spec 270 python3 -m server.benchmarks.spec "$GGUF" --dtype bfloat16 \
          --speculative head --speculative-model "$OUT/head.safetensors" --on-mismatch count \
          --result-json "$OUT/spec_head.json"
      else
        echo "=== drafter: skipped (no GGUF=...)"
      fi ;;
    verify)
      head="${HEAD:-$OUT/head.safetensors}"
      if [ -n "$GGUF" ] && [ -f "$head" ]; then
        for mode in on off; do
          step "verify_$mode" 270 python3 -m server.benchmarks.spec "$GGUF" --dtype bfloat16 \
            --speculative head --speculative-model "$head" --on-mismatch count \
            --result-json "$OUT/spec_head_verify_$mode.json" \
            $([ "$mode" = off ] && echo --no-verify-ahead) ${VERIFY_ARGS:-}
        done
      else
        echo "=== verify: skipped (needs GGUF=... and a head: HEAD=... or the drafter step)"
      fi ;;
    serve)
      if [ -n "$GGUF" ]; then
        step serve "${SERVE_LIMIT:-420}" env OUT="$OUT" GGUF="$GGUF" bash scripts/gpu_serve.sh
      else
        echo "=== serve: skipped (no GGUF=...)"
      fi ;;
    prompts)  # prompt graphs against eager prompt steps: $GGUF, else a random model of the
      # default model's shape (SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads)
      model="${GGUF:-/tmp/smolshape}"
      [ -n "$GGUF" ] || python3 -c "from pathlib import Path; from tests.tiny_models import \
save_tiny_model as s; s('llama', Path('$model'), hidden_size=576, intermediate_size=1536, \
num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, \
max_position_embeddings=8192)" >/dev/null 2>&1
      step prompts 240 python3 -m server.benchmarks.prompt_steps "$model" ${PROMPTS_ARGS:-} ;;
    probe) step probe 240 python3 -m kernels.probe_loads ;;
    attention) step attention 300 python3 -m kernels.bench_attention --json "$OUT/attention.json" \
      ${ATTENTION_ARGS:-} ;;
    tune)  # this device's GEMV table ($OUT/table.json, to copy to kernels/tables/), which
      # the later steps of the call then use
      step tune "${TUNE_LIMIT:-540}" python3 -m kernels.tune_gpu --out "$OUT/table.json" \
        ${TUNE_ARGS:-}
      [ -f "$OUT/table.json" ] && export LEAPFROG_GEMV_TABLE="$OUT/table.json" ;;
    *) echo "unknown step $s"; rc=1 ;;
  esac
done
echo "session rc=$rc"
exit $rc
