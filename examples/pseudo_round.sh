#!/usr/bin/env bash
# One pseudo-label round: predict the test set with probabilities, keep confident images, retrain.
set -euo pipefail
DATA=${DATA:-data}
RUN=${RUN:-runs/hr48_f0}
handseg predict "$RUN" --data "$DATA/test" -o pred_round0.csv --probs probs_round0
handseg pseudo probs_round0 --data "$DATA/test" --out pseudo_round0 --min-confidence 0.9 --overwrite
handseg train --data "$DATA/train" --splits splits.json --fold 0 --arch unetplusplus --encoder hrnet_w48 \
  --size 1024 --epochs 60 --extra pseudo_round0 --out runs/hr48_f0_pseudo
