#!/usr/bin/env bash
# The speed matrix of GitHub issue 5 on one GPU, in one go: the paper protocol and the fast protocol with the
# official DiT sampler timed beside (same weights, inputs and batches), fast-DiT's training table at global
# batch 128, and the markdown report over all of it. Runs from a plain checkout (no install needed).
#
#   reports/run-speed-matrix.sh OUT_DIR [CHECKOUT_OF_facebookresearch/DiT]
#
# Environment knobs (defaults are the issue's matrix): MODEL=DiT-XL/2 IMAGE_SIZE=256 STEPS=250
# GLOBAL_BATCH=128 STAGES="paper fast-fixed fast-auto train" COMPILE_MODE=default MAX_BATCH (auto search cap)
# VAE=random (none: no decode timing, and only the pre-extracted-feature training configurations)
# STAGE_TIMEOUT=seconds per stage (0: none). A stage that fails or times out is named on stderr and the
# others still run; the report covers every record written, and the exit status says whether all ran.
set -uo pipefail
out=${1:?usage: reports/run-speed-matrix.sh OUT_DIR [OFFICIAL_DIT_CHECKOUT]}
official=${2:-}
model=${MODEL:-DiT-XL/2}
stages=${STAGES:-paper fast-fixed fast-auto train}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "$official" ]; then official=$(cd "$official" && pwd) || exit 2; fi
cd "$(dirname "$0")/.."

# Each stage is one dit-bench call, so a per-call timeout is a per-stage one.
dit() { timeout "${STAGE_TIMEOUT:-0}" python -m cli "$@"; }
common=(--model "$model" --image-size "${IMAGE_SIZE:-256}" --steps "${STEPS:-250}")
beside=()
if [ -n "$official" ]; then beside=(--official-code "$official"); fi
fast=(--compile-mode "${COMPILE_MODE:-default}")
if [ -n "${MAX_BATCH:-}" ]; then fast+=(--max-batch "$MAX_BATCH"); fi

run_stage() {
  local stage=$1
  case $stage in
    # FasterDiffusion's timing protocol (batch 8, fp32 + TF32, the official loop); 3 timed loops, not 1.
    paper) dit speed "${common[@]}" --protocol paper --batch 8 --repeats 3 "${beside[@]}" --out "$out/paper.json" ;;
    # Latency at batch 1 and 8, with the VAE decode (SD architecture, random weights) and end to end.
    fast-fixed) dit speed "${common[@]}" "${fast[@]}" --batch 1 --batch 8 --vae "${VAE:-random}" --warmup 1 --repeats 3 \
                  "${beside[@]}" --out "$out/fast-fixed.json" ;;
    # Throughput at the saturating batch: each full loop there is long, so 1 warm-up and 2 timed loops.
    fast-auto) dit speed "${common[@]}" "${fast[@]}" --batch auto --warmup 1 --repeats 2 "${beside[@]}" \
                 --out "$out/fast-auto.json" ;;
    # fast-DiT's six configurations (plain, ckpt, amp, features, all, no-tf32; plain is out of memory on an
    # 80 GB A100 at 128, and says so as a row), then dit-bench's fast one (bf16, compiled, fused attention).
    train) dit speed --model "$model" --image-size "${IMAGE_SIZE:-256}" --no-sample --train --vae "${VAE:-random}" \
             --global-batch-size "${GLOBAL_BATCH:-128}" --out "$out/train.json" ;;
    *) echo "unknown stage $stage (paper, fast-fixed, fast-auto, train)" >&2; return 2 ;;
  esac
}

failed=()
for stage in $stages; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  run_stage "$stage"
  status=$?
  if [ $status -ne 0 ]; then
    echo "stage $stage failed (exit $status); going on with the others" >&2
    failed+=("$stage")
  fi
done
shopt -s nullglob
records=("$out"/*.json)
if [ ${#records[@]} -gt 0 ]; then dit report "${records[@]}" --out "$out/report.md" || failed+=(report); fi
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}" >&2; exit 1; fi
