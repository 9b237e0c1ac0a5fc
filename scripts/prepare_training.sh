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
