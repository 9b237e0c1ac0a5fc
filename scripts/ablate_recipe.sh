#!/usr/bin/env bash
# One ingredient at a time: the shipped by-drive recipe (fixed cluster classes, the decoder on the
# merged sequence, bf16, last epoch)
# against the same recipe with a single change, on the same leave-one-drive-out folds and schedule.
# Each arm trains on two drives and is measured (clustvit eval, every frame) on the third, at the
# packaged default threshold and with merging off. An ingredient earns its place only if taking it
# out loses mIoU on the held-out drive (issue 11). Resumable: run it again after an interruption.
#   SHARED=../shared DEVICE=cpu EPOCHS=40 FOLDS=0016E5 scripts/ablate_recipe.sh
# VAL_EVERY (default EPOCHS) also validates mid-run, to compare arms at the same epoch of one schedule.
# ARMS picks arms by name (default: every arm below). An arm whose
# <drive>_<arm>.done exists in the runs folder is not trained again (a checkpoint trained elsewhere
# with the same options may be put there).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare_training.sh"
epochs="${EPOCHS:-40}"
folds=(${FOLDS:-0016E5})
threshold="${THRESHOLD:-0.3}"  # the packaged default
# Each arm is the shipped recipe plus these options; a later option replaces the recipe's own.
declare -A arm_options=(
  [shipped]=""
  [no_class_weighting]="--class-weighting none"        # the plain cross-entropy (shipped until 2026-12-07)
  [no_rare_sampling]="--rare-class-temperature 0"
  [no_domain_shift]="--augment basic"                  # colour jitter only
  [no_ema]="--ema-decay 0"
  [narrow_scales]="--scale-range 0.75 1.75"            # the previous recipe's scales
  # The decoder on all tokens (shipped until the evening of 2026-12-07, when this script's runs
  # named <drive>_head_on_merged were today's shipped arm and <drive>_shipped this arm).
  [decoder_on_all_tokens]="--no-head-on-merged"
)
arms=(${ARMS:-shipped no_class_weighting no_rare_sampling no_domain_shift no_ema narrow_scales decoder_on_all_tokens})
set_training_recipe "$shipped_cluster_classes" "${PRECISION:-bf16}"
# Schedules and decoders (HEAD_ON_MERGED) never share a checkpoint.
runs="runs/ablate_recipe/${epochs}_epochs$run_suffix"
mkdir -p "$runs"
for drive in "${folds[@]}"; do
  for arm in "${arms[@]}"; do
    [ -n "${arm_options[$arm]+set}" ] || { echo "unknown arm $arm (known: ${!arm_options[*]})" >&2; exit 2; }
    run="$runs/${drive}_$arm"
    if [ ! -f "$run.done" ]; then
      # shellcheck disable=SC2086  # the options are words
      "$clustvit" train --data "$data" --out "$run.safetensors" "${recipe[@]}" --epochs "$epochs" \
        --train-split train,val --train-exclude "${drive}_*" --val-split train,val --val-include "${drive}_*" \
        --val-every "${VAL_EVERY:-$epochs}" ${arm_options[$arm]}
      touch "$run.done"
    fi
    for t in "$threshold" 1.0; do
      result="$runs/${drive}_${arm}_t$t.json"
      [ -f "$result" ] && continue
      "$clustvit" eval --model "$run.safetensors" --data "$data" --split train,val --include "${drive}_*" \
        --merge-threshold "$t" --device "$device" --json > "$result.part"
      mv "$result.part" "$result"
    done
  done
done
.venv/bin/python - "$runs" "$threshold" "${arms[@]}" -- "${folds[@]}" <<'PY'
import json, os, sys
runs, threshold = sys.argv[1], sys.argv[2]
split = sys.argv.index("--")
arms, folds = sys.argv[3:split], sys.argv[split + 1:]
rare = ("Pedestrian", "Bicyclist", "SignSymbol", "Fence", "Pole", "Pavement")
print(f"held-out drive | arm | mIoU at {threshold} | merged | merging off | cost | " + " | ".join(rare))
for drive in folds:
    for arm in arms:
        paths = [f"{runs}/{drive}_{arm}_t{t}.json" for t in (threshold, "1.0")]
        if not all(os.path.exists(p) for p in paths):
            continue
        merged, off = (json.load(open(p)) for p in paths)
        classes = " | ".join(f"{merged['per_class_iou'].get(c, float('nan')):.1f}" for c in rare)
        print(f"{drive} | {arm} | {merged['miou']:.2f} | {merged['merged_fraction']:.2f} | {off['miou']:.2f} | "
              f"{merged['miou'] - off['miou']:+.2f} | {classes}")
PY
