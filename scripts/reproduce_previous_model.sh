#!/usr/bin/env bash
# Reproduces the packaged model of before 2026-12-01 (trained on CamVid train, selected on val;
# models/README.md, "The previous packaged file") from the offline ViT-Ti weights, in three runs.
# The current packaged file comes from scripts/train_by_drive.sh.
#   1. ClustViT-Ti (k=3, ip=4, Segmenter head), 80 epochs;
#   2. the plain ViT-Ti + Segmenter (no merging), 80 epochs: the accuracy baseline and
#      the teacher of stage 3;
#   3. stage 1's whole model, 24 more epochs distilled towards stage 2's predictions,
#      merging by the deployed threshold rule;
# then exports stage 3 in fp16 with the chosen inference size and merge threshold, its
# val figures at those settings stored in the metadata. Resumable: run it again after
# an interruption.
#   SHARED=../shared DEVICE=cpu OUT=runs/previous_model.safetensors scripts/reproduce_previous_model.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare_training.sh"
out="${OUT:-runs/previous_model.safetensors}"
stage1="runs/k3_ip4.safetensors"
plain="runs/plain.safetensors"
run="runs/stage2.safetensors"
threshold=0.27          # the most merging with val mIoU >= 67 (models/README.md)
inference_size=(480 640)  # 360x480 camera frames are upscaled: thin classes gain most

if [ ! -f runs/k3_ip4.done ]; then
  "$clustvit" train --data "$shared/datasets/camvid" --out "$stage1" --device "$device" \
    --init-backbone "$backbone" --clusters 3 --injection-point 4 --head segmenter --epochs 80 --resume
  touch runs/k3_ip4.done
fi
if [ ! -f runs/plain.done ]; then
  "$clustvit" train --data "$shared/datasets/camvid" --out "$plain" --device "$device" \
    --init-backbone "$backbone" --clusters 0 --head segmenter --epochs 80 --resume
  touch runs/plain.done
fi
if [ ! -f runs/stage2.done ]; then
  "$clustvit" train --data "$shared/datasets/camvid" --out "$run" --device "$device" \
    --init-from "$stage1" --keep-cluster-module --distill-from "$plain" --distill-weight 1.0 \
    --train-merge-threshold 0.25 --clusters 3 --injection-point 4 --head segmenter \
    --epochs 24 --lr 6e-5 --warmup-steps 30 --cluster-warmup-epochs 0 --resume
  touch runs/stage2.done
fi
"$clustvit" export --model "$run" --out "$out" --half --merge-threshold "$threshold" \
  --input-size "${inference_size[@]}"
# The training-time figures were at 480 px / threshold 0.5: store the shipped settings' own.
"$clustvit" eval --model "$out" --data "$shared/datasets/camvid" --split val --device "$device" --json \
  > runs/default_model_val.json
.venv/bin/python - "$run" <<'EOF' > runs/default_model_info.json
import json, sys
from clustvit_ros.model import read_metadata
val = json.load(open("runs/default_model_val.json"))
_, info = read_metadata(sys.argv[1])
print(json.dumps({"val_metrics": {k: val[k] for k in ("miou", "per_class_iou", "pixel_accuracy", "images",
                                                      "merged_fraction", "mean_tokens_in",
                                                      "mean_tokens_after_merge", "inference_size", "strategy")},
                  "val_metrics_at_training": info.get("val_metrics")}))
EOF
"$clustvit" export --model "$run" --out "$out" --half --merge-threshold "$threshold" \
  --input-size "${inference_size[@]}" --info runs/default_model_info.json
echo "wrote $out (val mIoU $(.venv/bin/python -c 'import json; print(round(json.load(open("runs/default_model_val.json"))["miou"], 2))'))"
