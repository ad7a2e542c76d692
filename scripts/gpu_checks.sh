#!/usr/bin/env bash
# Everything GPU-related in one command, for the lent H200 (or any CUDA machine with jax[cuda]); writes under $OUT.
#
#   bash scripts/gpu_checks.sh                      # all steps, in priority order
#   bash scripts/gpu_checks.sh pytest attention     # only these steps (split across calls when time is short)
#
# Steps (in this order): pytest     `pytest -m gpu tests` (the gpu-marked kernel tests)
#                        attention  `scripts/bench_attention.py` (copy bandwidth, decode kernel, baselines, scoring)
#                        generate   `scripts/bench_generate.py --preset llama3-8b --dtype bfloat16`
#                        kvzip      `scripts/bench_kvzip.py --preset llama3-8b --dtype bfloat16 --context 32768`
#                        encoders   `scripts/bench_encoders.py --preset vit-l14-336 --dtype bfloat16 --batch 32
#                                   --no-torch` (only when named: the LLaVA-1.5 tower against its FLOP floor)
#                        tune       `scripts/bench_attention.py --sections tune` (only when named: the decode kernel's
#                                   block_keys x num_warps x num_stages at B 1 and 16, 32K, ratio 0.3; $OUT/tune/)
#                        layerscan  `scripts/bench_layer_scan.py --no-hf` (only when named: does XLA:GPU read the
#                                   scanned layers' weight slices in place? per-layer / scanned near 1 says yes)
#                        moka       `scripts/bench_moka.py --gpu-shape` (only when named: MokA's training step
#                                   against LoRA at the LLaMA-2-7B shape, bf16, 1 x 1024 tokens)
# Each step runs under `timeout`, capped by its own limit and by what is left of the whole budget
# (GPU_CHECKS_BUDGET_S, default 570 s: the device allows 600 s per command). A failing or timed-out step is recorded
# and the next one still runs; a step with under 30 s left is skipped. A summary table ends the log.
# Files under $OUT (at most 8 come back, none deeper than 2 folders): gpu_checks.log, summary.txt,
# bench_attention.json, bench_attention.csv, bench_8b.json, bench_kvzip.json, layer_scan.json, bench_encoders.json,
# bench_moka_gpu.json, tune/bench_attention.json.
set -u

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-demo_out/gpu_checks}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECKS_BUDGET_S:-570}"
LOG="$OUT/gpu_checks.log"
SUMMARY="$OUT/summary.txt"
START=$SECONDS
: >"$LOG"

if [ "$#" -eq 0 ]; then
  set -- pytest attention generate kvzip
fi

NAMES=()
RESULTS=()

log() { echo "$*" | tee -a "$LOG"; }

# run_step NAME CAP_SECONDS COMMAND...: run under timeout min(CAP, budget left - 15); record rc and wall time.
run_step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 15))
  local limit=$((cap < left ? cap : left))
  NAMES+=("$name")
  if [ "$limit" -lt 30 ]; then
    log "=== $name: skipped (${left}s of the ${BUDGET}s budget left)"
    RESULTS+=("skipped (no time left)")
    return
  fi
  log "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="TIMED OUT"
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED"
  fi
  log "=== $name: $verdict (rc $rc, ${dt}s)"
  RESULTS+=("$verdict (rc $rc, ${dt}s)")
}

log "gpu_checks: $(date -u '+%Y-%m-%d %H:%M UTC'), steps: $*, budget ${BUDGET}s, OUT=$OUT"
log "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git metadata')"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv 2>&1 | tee -a "$LOG"
fi
"$PY" -c 'import sys, jax, jaxlib; print("python", sys.version.split()[0], "jax", jax.__version__,
"jaxlib", jaxlib.__version__, "backend", jax.default_backend(), jax.devices())' 2>&1 | tee -a "$LOG"

for step in "$@"; do
  case "$step" in
    pytest)
      run_step pytest 150 "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider
      ;;
    attention)
      # --time-budget stops starting new (batch, context) groups (largest first) before the timeout would hit.
      run_step attention 300 "$PY" scripts/bench_attention.py --out "$OUT" --time-budget 210
      ;;
    generate)
      # No preallocation: the transformers (torch) side shares the GPU after ours in the same process.
      run_step generate 240 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" scripts/bench_generate.py \
        --preset llama3-8b --dtype bfloat16 --json "$OUT/bench_8b.json"
      ;;
    kvzip)
      # 32K only, to fit the budget; add 131072 to --context when a call has ~5 more minutes.
      run_step kvzip 240 "$PY" scripts/bench_kvzip.py --preset llama3-8b --dtype bfloat16 --context 32768 \
        --json "$OUT/bench_kvzip.json"
      ;;
    encoders)
      run_step encoders 120 "$PY" scripts/bench_encoders.py --preset vit-l14-336 --dtype bfloat16 --batch 32 \
        --no-torch --no-whisper --json "$OUT/bench_encoders.json"
      ;;
    tune)
      run_step tune 240 "$PY" scripts/bench_attention.py --sections copy,tune --copy-gib 1 --repeats 10 \
        --out "$OUT/tune"
      ;;
    layerscan)
      run_step layerscan 120 "$PY" scripts/bench_layer_scan.py --no-hf --json "$OUT/layer_scan.json"
      ;;
    moka)
      run_step moka 300 "$PY" scripts/bench_moka.py --gpu-shape --no-progress --json "$OUT/bench_moka_gpu.json"
      ;;
    *)
      NAMES+=("$step")
      RESULTS+=("unknown step (choose pytest, attention, generate, kvzip, encoders, tune, layerscan, moka)")
      ;;
  esac
done

{
  echo
  echo "## gpu_checks summary ($((SECONDS - START))s of ${BUDGET}s)"
  echo
  echo "| step | result |"
  echo "|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${RESULTS[$i]} |"
  done
} | tee "$SUMMARY" | tee -a "$LOG"

for r in "${RESULTS[@]}"; do
  case "$r" in ok*) ;; *) exit 1 ;; esac
done
exit 0
