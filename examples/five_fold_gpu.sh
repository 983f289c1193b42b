#!/usr/bin/env bash
# The winning teams' recipe: 5 patient-grouped folds at 1024 px (HRNet-W48 UNet++), each fold
# predicted with horizontal-flip TTA, then a hard vote across folds and a diverse second model.
set -euo pipefail
DATA=${DATA:-data}            # holds train/ and test/ in the competition layout
handseg prep json2npy --data "$DATA/train" --workers 8
handseg prep png2npy --data "$DATA/train" --workers 8
handseg kfold --data "$DATA/train" --folds 5 --stratify bend -o splits.json --overwrite
for FOLD in 0 1 2 3 4; do
  handseg train --data "$DATA/train" --splits splits.json --fold "$FOLD" --arch unetplusplus --encoder hrnet_w48 \
    --size 1024 --epochs 60 --batch-size 4 --loss bce:0.5,dice:0.5 --augment default --out "runs/hr48_f$FOLD"
  handseg tta "runs/hr48_f$FOLD" --data "$DATA/test" -o "pred/hr48_f$FOLD.csv" --transforms hflip \
    --probs "probs/hr48_f$FOLD"
done
# a second, different model on full-resolution crops (sliding window at predict time)
handseg train --data "$DATA/train" --splits splits.json --fold 0 --arch unet --encoder efficientnet_b4 \
  --crop 1024 --epochs 60 --out runs/effb4_crop
handseg tta runs/effb4_crop --data "$DATA/test" -o pred/effb4_crop.csv --transforms hflip
handseg vote hard pred/hr48_f*.csv pred/effb4_crop.csv -o submission.csv
handseg compare pred/hr48_f*.csv pred/effb4_crop.csv submission.csv --data "$DATA/test" --out report/ --overwrite
