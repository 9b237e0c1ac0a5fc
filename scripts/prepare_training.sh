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
by_drive_recipe=(--input-size 480 640 --crop-size 352 480 --scale-range 0.5 1.5 --augment domain-shift
                 --rare-class-temperature 0.1 --ema-decay 0.998)
# Fixed cluster classes (train --cluster-classes): on folds 0016E5 (40 epochs) and 0006R0 (12)
# they merge more and cost under 1 mIoU, but still merge pavement into road (models/README.md).
# Not yet in the shipped recipe: no 40-epoch 0006R0 fold, and the packaged file trained without
# them. CLUSTER_CLASSES="Road Sky Building" adds them to a run.
if [ -n "${CLUSTER_CLASSES:-}" ]; then
  # shellcheck disable=SC2206  # class names are words
  by_drive_recipe+=(--cluster-classes ${CLUSTER_CLASSES})
fi
