#!/usr/bin/env bash
# GPU smoke run (issue 12, item 9). On a CUDA machine, from the repository root:
#
#   bash bench/gpu_smoke.sh                # both parts, ~12 min on one H100/H200
#   bash bench/gpu_smoke.sh --dry-run      # no GPU needed: validate, plan, print the commands
#   bash bench/gpu_smoke.sh --tiny         # no GPU needed: the same plumbing on CPU at toy size
#
# Part 1: the whole demo pipeline (bench/gpu_smoke.yaml: ~0.5B Llama source -> ~1.5B Qwen3 target,
#         built from config, synthetic stream), timed against the 8-minute goal.
# Part 2: masked ZeRO-3 training throughput against full fine-tuning on a ~1B Llama
#         (bench/zero3_throughput.py): tensor cores should reach >= 0.95x full FT tokens/s; element
#         granularity is reported.
# Before each part `trace-transfer plan` prints the memory it expects; part 2 prints the measured peak
# next to the planned figure. Everything lands in --out (default runs/gpu-smoke): summary.txt, the
# plan, the pipeline's run directory and report, throughput.json.
#
# Options: --out DIR, --gpus N (ranks for part 2, default 1), --skip-pipeline, --skip-throughput.
# Environment: GPU_TYPE (the planner's GPU name), PIPELINE_TIMEOUT (seconds, default 600), PYTHON.
set -euo pipefail

OUT=runs/gpu-smoke
GPUS=1
DRY=0
TINY=0
PIPELINE=1
THROUGHPUT=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --tiny) TINY=1; shift ;;
    --skip-pipeline) PIPELINE=0; shift ;;
    --skip-throughput) THROUGHPUT=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_smoke.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CONFIG=bench/gpu_smoke.yaml
[[ $TINY == 1 ]] && CONFIG=examples/pipelines/tiny.yaml

# CUDA up front: a smoke run that silently trains on the CPU would report meaningless figures.
if [[ $DRY == 0 && $TINY == 0 ]]; then
  if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
             "run this on a GPU machine with a CUDA build of torch, or use --dry-run / --tiny to check the "
             "plumbing on CPU")
print(f"CUDA: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF
  then
    exit 3
  fi
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$@" | tee -a "$SUMMARY"; }
run() {  # print the command; run it unless --dry-run, its output into the summary too
  say "\$ $*"
  [[ $DRY == 1 ]] || "$@" 2>&1 | tee -a "$SUMMARY"
}

say "gpu_smoke: $(date -u +%Y-%m-%dT%H:%M:%SZ), out=$OUT, config=$CONFIG$([[ $TINY == 1 ]] && echo ' (tiny, CPU)')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$SUMMARY" || true

# The plan first (it validates the config, all problems at once): what every step should need on this
# GPU type (GPU_TYPE, else guessed from nvidia-smi, else h100).
if [[ -z "${GPU_TYPE:-}" ]] && command -v nvidia-smi >/dev/null; then
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
    *H200*) GPU_TYPE=h200 ;; *H100*PCIe*) GPU_TYPE=h100-pcie ;; *H100*) GPU_TYPE=h100 ;;
    *A100*40GB*) GPU_TYPE=a100-40gb ;; *A100*) GPU_TYPE=a100 ;; *L40S*) GPU_TYPE=l40s ;; *B200*) GPU_TYPE=b200 ;;
  esac
fi
"$PY" -m trace_transfer plan "$CONFIG" --gpus 1 --gpu "${GPU_TYPE:-h100}" | tee "$OUT/plan.txt" | tee -a "$SUMMARY"

if [[ $PIPELINE == 1 ]]; then
  # Runtime device flags arrive with issue 12 item 1; until then the steps choose their device themselves.
  RUN_ARGS=()
  if "$PY" -m trace_transfer run --help | grep -q -- '--device'; then
    RUN_ARGS+=(--device "$([[ $TINY == 1 ]] && echo cpu || echo cuda)")
  else
    say "note: 'trace-transfer run' has no --device yet; steps that do not pick the GPU themselves run on the CPU"
  fi
  # A hard limit: GPU time is scarce, and a step that fell back to the CPU would run for hours. A rerun
  # with the same --out resumes after the last finished step.
  start=$(date +%s)
  status=0
  run timeout "${PIPELINE_TIMEOUT:-600}" "$PY" -m trace_transfer run "$CONFIG" --out "$OUT/pipeline" "${RUN_ARGS[@]}" \
    || status=$?
  elapsed=$(( $(date +%s) - start ))
  if [[ $DRY == 0 ]]; then
    if [[ $status == 124 ]]; then
      say "part 1: MISSED: pipeline stopped at the ${PIPELINE_TIMEOUT:-600}s limit (see which step in the log above)"
    elif [[ $status != 0 ]]; then
      say "part 1: FAILED (exit $status) after ${elapsed}s"
    else
      verdict=$([[ $elapsed -le 480 ]] && echo met || echo MISSED)
      say "part 1: pipeline in ${elapsed}s ($verdict: goal <= 480 s); report: $OUT/pipeline/report/report.md"
    fi
  fi
fi

if [[ $THROUGHPUT == 1 ]]; then
  TP_ARGS=(--gpus "$GPUS" --json "$OUT/throughput.json")
  [[ $TINY == 1 ]] && TP_ARGS+=(--tiny)
  run "$PY" bench/zero3_throughput.py "${TP_ARGS[@]}"
fi
say "summary: $SUMMARY"
