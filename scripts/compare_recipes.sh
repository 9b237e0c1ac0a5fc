#!/usr/bin/env bash
# The by-drive recipe against the previous one (reproduce_previous_model.sh's first run: the
# `clustvit train` defaults, 360x480), on the same leave-one-drive-out folds with the same
# schedule: each trains on two drives, keeps its last epoch and is measured on the third, at
# the deployed threshold 0.3 and with merging off. The previous file ran at 480x640, so its
# recipe is measured there too (re-exported) as well as at its training size. Resumable.
#   SHARED=../shared DEVICE=cpu EPOCHS=12 FOLDS="0006R0 0016E5" scripts/compare_recipes.sh
# RECIPES="new_recipe fixed_clusters" compares the by-drive recipe with and without fixed cluster classes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare_training.sh"
epochs="${EPOCHS:-12}"
folds=(${FOLDS:-0006R0 0016E5})
runs="runs/compare_recipes/${epochs}_epochs"  # schedules never share a checkpoint
mkdir -p "$runs"
declare -A recipe_options=([old_recipe]="" [new_recipe]="${by_drive_recipe[*]}"
                          [fixed_clusters]="${by_drive_recipe[*]} --clusters $(cluster_count "$shipped_cluster_classes") --cluster-classes $shipped_cluster_classes")
recipes=(${RECIPES:-old_recipe new_recipe})
for drive in "${folds[@]}"; do
  for recipe in "${recipes[@]}"; do
    run="$runs/${drive}_$recipe"
    if [ ! -f "$run.done" ]; then
      # shellcheck disable=SC2086  # the options are words
      "$clustvit" train --data "$data" --out "$run.safetensors" --device "$device" --init-backbone "$backbone" \
        --resume --epochs "$epochs" --keep last --train-split train,val --train-exclude "${drive}_*" \
        --val-split train,val --val-include "${drive}_*" --val-every "$epochs" ${recipe_options[$recipe]}
      touch "$run.done"
    fi
  done
  [ -f "$runs/${drive}_old_recipe_640.safetensors" ] || [ ! -f "$runs/${drive}_old_recipe.done" ] || "$clustvit" export --model "$runs/${drive}_old_recipe.safetensors" \
    --out "$runs/${drive}_old_recipe_640.safetensors" --input-size 480 640
  for model in new_recipe fixed_clusters old_recipe_640 old_recipe; do
    [ -f "$runs/${drive}_$model.safetensors" ] || continue
    for threshold in 0.3 1.0; do
      result="$runs/${drive}_${model}_t$threshold.json"
      [ -f "$result" ] && continue
      "$clustvit" eval --model "$runs/${drive}_$model.safetensors" --data "$data" --split train,val \
        --include "${drive}_*" --merge-threshold "$threshold" --device "$device" --json > "$result.part"
      mv "$result.part" "$result"
    done
  done
done
.venv/bin/python - "$runs" "${folds[@]}" <<'PY'
import json, os, sys
runs, folds = sys.argv[1], sys.argv[2:]
print("held-out drive | recipe (inference size) | mIoU at 0.3 | merged | mIoU merging off")
for drive in folds:
    for model, name in (("new_recipe", "by-drive (480x640)"), ("fixed_clusters", "by-drive, fixed clusters"),
                        ("old_recipe_640", "previous (480x640)"), ("old_recipe", "previous (360x480)")):
        if not os.path.exists(f"{runs}/{drive}_{model}_t1.0.json"):
            continue
        merged, off = (json.load(open(f"{runs}/{drive}_{model}_t{t}.json")) for t in ("0.3", "1.0"))
        print(f"{drive} | {name} | {merged['miou']:.2f} | {merged['merged_fraction']:.2f} | {off['miou']:.2f}")
PY
