#!/usr/bin/env bash
# The winning teams' loop, without the notebooks: two diverse configurations x 5 patient-grouped folds,
# each fold writing its out-of-fold maps; `select` chooses the ensemble, class-wise picks, per-class
# thresholds and keep-largest on those maps; `predict --recipe` applies the choice to the test set.
set -euo pipefail
DATA=${DATA:-data}            # holds train/ and test/ in the competition layout
handseg prep json2npy --data "$DATA/train" --workers 8
handseg prep png2npy --data "$DATA/train" --workers 8
handseg kfold --data "$DATA/train" --folds 5 --stratify bend -o splits.json --overwrite
for FOLD in 0 1 2 3 4; do
  handseg train --data "$DATA/train" --splits splits.json --fold "$FOLD" --arch unetplusplus --encoder hrnet_w48 \
    --size 1024 --epochs 60 --batch-size 4 --loss bce:0.5,dice:0.5 --oof-tta hflip --out "runs/hr48_f$FOLD"
  handseg train --data "$DATA/train" --splits splits.json --fold "$FOLD" --arch upernet \
    --encoder swin_base_patch4_window7_224 --size 1024 --epochs 60 --batch-size 4 --oof-tta hflip \
    --out "runs/swinb_f$FOLD"
done
handseg select runs/hr48_f* runs/swinb_f* -o recipe.json --overwrite
handseg predict --recipe recipe.json --data "$DATA/test" -o submission.csv --overwrite
handseg predict --recipe recipe.json --oof --data "$DATA/train" -o oof.csv --overwrite   # select's Dice again
handseg predict runs/hr48_f0 runs/hr48_f1 runs/hr48_f2 runs/hr48_f3 runs/hr48_f4 --data "$DATA/test" \
  -o hr48_folds.csv --overwrite
handseg compare submission.csv hr48_folds.csv --data "$DATA/test" --out report/ --overwrite
handseg export --recipe recipe.json -o model.zip --overwrite                          # one file for elsewhere
