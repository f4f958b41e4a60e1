#!/usr/bin/env bash
# The GPU check, in one call: environment, the CUDA tests, the throughput benchmark.
#
#   OUT=/some/folder bash bench/gpu.sh           # on a CUDA machine (repo root as cwd)
#   OUT=/tmp/gpuout bash bench/gpu.sh --smoke    # tiny sizes on the CPU, to try the script
#
# Writes $OUT/gpu-log.txt (everything printed), $OUT/gpu-results.md (versions, test
# summary, benchmark tables, appended part by part) and each benchmark part's own
# $OUT/bench-*.md / .json, rewritten after every measurement. Every part has a timeout and
# the whole script keeps to a budget (GPU_SH_BUDGET seconds, default 450: under 8 minutes),
# so a failing or slow part costs only its own results. With less device time left than
# the budget plus a machine's start (a minute or two), lower it: GPU_SH_BUDGET=240.
#
# Parts (GPU): 1. nvidia-smi, torch / transformers / peft versions; 2. tests/test_cuda.py
# (python -m from the repo root: the project is not installed there); 3. TinyLlama-1.1B's shape, bf16,
# N = 1, 4, 8 adapters (8 only if time is left), variants A (packed), P (padded rows), B,
# C; 4. the tiny and
# SmolLM2-135M shapes, bf16, N = 1, 8, variants A and B.
set -u -o pipefail

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    *) echo "usage: OUT=folder bash bench/gpu.sh [--smoke]" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu-log.txt"
RESULTS="$OUT/gpu-results.md"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

START=$(date +%s)
BUDGET="${GPU_SH_BUDGET:-450}"
if [ "$SMOKE" = 1 ]; then BUDGET="${GPU_SH_BUDGET:-170}"; fi
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# cap SECONDS: the part's limit, within what is left of the budget (minus a reserve).
cap() {
  local l; l=$(( $(left) - ${2:-5} ))
  if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}
section() { echo; echo "=== $* ($(( $(date +%s) - START )) s, $(left) s left) ==="; }

if [ "$SMOKE" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown")
DIRTY=$(git status --porcelain 2>/dev/null | head -1)

section "environment"
{
  echo "# GPU check: bench/gpu.sh$([ "$SMOKE" = 1 ] && echo ' --smoke (CPU, tiny sizes)')"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit $COMMIT${DIRTY:+ (working tree has uncommitted changes)}; host $(hostname)."
} >"$RESULTS"
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 30 nvidia-smi || echo "nvidia-smi failed"
  GPU_LINE=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
  echo "- GPU: ${GPU_LINE:-unknown} (nvidia-smi)." >>"$RESULTS"
else
  echo "nvidia-smi: not found"
  echo "- GPU: none (no nvidia-smi)." >>"$RESULTS"
fi
VERSIONS=$(timeout 120 "$PY" - <<'EOF' 2>&1
import platform, os
import torch, transformers
try:
    import peft
    peft_version = peft.__version__
except ImportError:
    peft_version = "not installed"
cuda = torch.cuda.is_available()
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available: {cuda}), transformers {transformers.__version__}, peft {peft_version}; "
      f"{os.cpu_count()} CPUs" + (f"; {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if cuda else ""))
EOF
)
echo "$VERSIONS"
echo "- $(echo "$VERSIONS" | tail -1)." >>"$RESULTS"
echo "- Budget: $BUDGET s for the whole script; per-part limits below." >>"$RESULTS"

# Part limits, from the budget: the tests about 28% (at most 130 s), TinyLlama 47% (at most
# 210 s), the small shapes what is left (at most 110 s). A smaller GPU_SH_BUDGET (say 240
# when less device time is left) shrinks them alike; each benchmark part then measures the
# smaller N first and skips what its deadline does not allow.
T_TESTS=$(( BUDGET * 28 / 100 )); [ "$T_TESTS" -gt 130 ] && T_TESTS=130
T_LLAMA=$(( BUDGET * 47 / 100 )); [ "$T_LLAMA" -gt 210 ] && T_LLAMA=210
if [ "$SMOKE" = 1 ]; then T_TESTS=40; T_LLAMA=60; fi

section "CUDA tests (tests/test_cuda.py)"
T=$(cap "$T_TESTS" $(( T_LLAMA + 30 )))
[ "$T" -lt 20 ] && T=20
echo "limit $T s"
timeout -k 5 "$T" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs \
  2>&1 | tee "$OUT/.tests.txt"
TEST_RC=${PIPESTATUS[0]}
SUMMARY=$(grep -E "passed|failed|skipped|error|no tests ran" "$OUT/.tests.txt" | tail -1)
[ "$TEST_RC" = 124 ] && SUMMARY="timed out after $T s; last: $SUMMARY"
FAILED=$(grep -E "^(FAILED|ERROR) " "$OUT/.tests.txt" | head -20)
rm -f "$OUT/.tests.txt"
{
  echo
  echo "## CUDA tests"
  echo
  echo "\`python -m pytest tests/test_cuda.py\` (limit $T s, exit $TEST_RC): ${SUMMARY:-no summary line}"
  [ -n "$FAILED" ] && { echo; echo '```'; echo "$FAILED"; echo '```'; }
} >>"$RESULTS"

# bench PART LIMIT RESERVE ARGS...: one benchmark part, its report appended to RESULTS.
bench() {
  local part=$1 limit=$2 reserve=$3; shift 3
  local T; T=$(cap "$limit" "$reserve")
  section "benchmark: $part (limit $T s)"
  if [ "$T" -lt 30 ]; then
    echo "skipped: not enough time left"
    printf '\n## Benchmark: %s\n\nSkipped: not enough time left.\n' "$part" >>"$RESULTS"
    return
  fi
  rm -f "$OUT/bench-$part.md" "$OUT/bench-$part.json"
  timeout -k 10 "$T" "$PY" -m bench.bench --device "$DEVICE" --deadline $(( T - 15 )) \
    --worker-timeout $(( T - 20 )) --model-cache "$CACHE" \
    --out "$OUT/bench-$part.md" --json "$OUT/bench-$part.json" --quiet "$@"
  local rc=$?
  {
    echo
    echo "## Benchmark: $part"
    echo
    echo "\`python -m bench.bench --device $DEVICE $*\` (limit $T s, exit $rc)"
    echo
    if [ -f "$OUT/bench-$part.md" ]; then sed -e 's/^# /### /' -e 's/^## /### /' "$OUT/bench-$part.md"
    else echo "No report written."; fi
  } >>"$RESULTS"
}

CACHE=$(mktemp -d /tmp/mlora-gpu-models.XXXXXX)
trap 'rm -rf "$CACHE"' EXIT

if [ "$SMOKE" = 1 ]; then
  SIZES=(--steps 1 --warmup 1 --rows 1 --length-scale 0.25 --cutoff 64 --wait-quiet 0)
  bench tinyllama "$T_LLAMA" 50 --model tinyllama --layers 1 --n 1 --variants A,P,B --packing on \
    "${SIZES[@]}"
  bench small 80 5 --model tiny,smollm2 --layers 2 --n 2 --variants A,B,C "${SIZES[@]}"
else
  GPU_SIZES=(--dtype bf16 --steps 10 --warmup 3 --rows 4)
  # TinyLlama first: the reason for the machine. N=8 runs last and only if time is left.
  # A packs ([train] packing = "on"; "auto" leaves it off on CUDA until measured), P is
  # the engine on padded rows: their ratio says whether "auto" should pack on a GPU.
  bench tinyllama "$T_LLAMA" 30 --model tinyllama --n 1,4,8 --variants A,P,B,C --packing on \
    "${GPU_SIZES[@]}"
  bench small 110 5 --model tiny,smollm2 --n 1,8 --variants A,B "${GPU_SIZES[@]}"
fi

section "done"
echo >>"$RESULTS"
echo "- Finished in $(( $(date +%s) - START )) s." >>"$RESULTS"
echo "results: $RESULTS; log: $LOG"
