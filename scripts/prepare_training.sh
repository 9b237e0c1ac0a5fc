# Sourced by the training scripts: set up .venv if needed, cd to the repository root ($root),
# and name the inputs every training run uses (SHARED, DEVICE from the environment).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
cd "$root"
shared="${SHARED:-../shared}"
device="${DEVICE:-auto}"
data="$shared/datasets/camvid"
backbone="$shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
clustvit=".venv/bin/clustvit"
mkdir -p runs
# The by-drive recipe's own options (models/README.md), shared by train_by_drive.sh and
# compare_recipes.sh so that what is compared is what ships.
# The loss weighted by 1/sqrt(pixel share) since 2026-12-07: on fold 0016E5 it lifted held-out mIoU
# from 47.5 to 53.5 at threshold 0.5 (scripts/ablate_recipe.sh, models/README.md).
# --augment domain-shift against colour jitter only, three folds at threshold 0.3: +0.95 mIoU on the
# mean, +5.2 on dusk drive 0001TP (it costs 0.9-1.4 on the daylight drives; models/README.md).
# --rare-class-temperature 0.1 against uniform drawing, three folds at 0.3: +0.63 mIoU on the mean.
# --ema-decay 0.998 against the raw last-epoch weights, three folds at 0.3: level (-0.04 on the mean);
# it stays only because the packaged file trained with it: drop it at that file's next retrain.
# --scale-range 0.5 1.5 against 0.75 1.75, fold 0016E5 only: -0.9 mIoU at 0.3, +1.1 with merging off
# (undecided until folds 0006R0 and 0001TP run).
by_drive_recipe=(--input-size 480 640 --crop-size 352 480 --scale-range 0.5 1.5 --augment domain-shift
                 --rare-class-temperature 0.1 --ema-decay 0.998 --class-weighting sqrt-inverse)
# Fixed cluster classes (train --cluster-classes): cluster 1 always gathers Road, 2 Sky, 3 Building,
# 4 Tree. Part of the shipped recipe since 2026-12-05 (Tree, a fourth cluster, since 2026-12-06;
# train_by_drive.sh adds them; CLUSTER_CLASSES="" there trains the paper's per-image frequency
# ranks instead); models/README.md has the folds.
shipped_cluster_classes="Road Sky Building Tree"
# cluster_count CLASSES: k for a list of fixed cluster classes, one cluster per name (3, the
# paper's k, for none: per-image ranks).
cluster_count() {
  # shellcheck disable=SC2206  # class names are words
  local words=($1)
  echo "$(( ${#words[@]} > 0 ? ${#words[@]} : 3 ))"
}
# set_training_recipe CLASSES PRECISION: the array `recipe`, every option a by-drive training run
# shares (the recipe, one cluster per fixed class, the decoder on the merged sequence, the last
# epoch kept, this machine's device, the backbone, resuming), so that train_by_drive.sh and
# ablate_recipe.sh train the same thing.
# The Segmenter decoder on the merged sequence from the first epoch (train --head-on-merged) is
# part of the shipped recipe since the evening of 2026-12-07: on the three folds it scores what the
# decoder on all tokens scores and runs faster (models/README.md). HEAD_ON_MERGED=0 trains the
# decoder on all tokens instead (the file packaged earlier that day); the scripts' default runs
# folders then end in $run_suffix, so that the two decoders never share a checkpoint.
set_training_recipe() {
  local classes="$1" precision="$2"
  # shellcheck disable=SC2206  # class names are words
  recipe=("${by_drive_recipe[@]}" --clusters "$(cluster_count "$classes")" ${classes:+--cluster-classes $classes}
          --keep last --device "$device" --init-backbone "$backbone" --resume --precision "$precision")
  case "${HEAD_ON_MERGED:-1}" in
    1) recipe+=(--head-on-merged) run_suffix="" ;;
    0) run_suffix="_decoder_on_all_tokens" ;;
    *) echo "HEAD_ON_MERGED must be 0 or 1, not '$HEAD_ON_MERGED'" >&2; exit 2 ;;
  esac
}
