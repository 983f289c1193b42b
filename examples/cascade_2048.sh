#!/usr/bin/env bash
# Full resolution with global context (a cascade, as nnU-Net's): stage 1 sees whole images at 512 px,
# stage 2 trains on 1024 px crops of the 2048 px X-rays with stage 1's 29 maps of the crop as extra
# input channels (out-of-fold for every training image, since stage 1 runs all five folds).
set -euo pipefail
DATA=${DATA:-data}
handseg kfold --data "$DATA/train" --folds 5 --stratify bend -o splits.json --overwrite
for FOLD in 0 1 2 3 4; do
  handseg train --data "$DATA/train" --splits splits.json --fold "$FOLD" --arch unetplusplus --encoder hrnet_w48 \
    --size 512 --epochs 40 --out "runs/low_f$FOLD"
done
for FOLD in 0 1 2 3 4; do
  handseg train --data "$DATA/train" --splits splits.json --fold "$FOLD" --arch unetplusplus --encoder hrnet_w48 \
    --crop 1024 --epochs 40 --batch-size 4 --context runs/low_f0 runs/low_f1 runs/low_f2 runs/low_f3 runs/low_f4 \
    --out "runs/cascade_f$FOLD"
done
# stage 1 runs once per image, then each stage-2 fold; no model flags
handseg predict runs/cascade_f0 runs/cascade_f1 runs/cascade_f2 runs/cascade_f3 runs/cascade_f4 \
  --data "$DATA/test" -o cascade.csv --batch-size 8 --overwrite
