#!/usr/bin/env bash
# One model on all GPUs of a machine at 2048 px (DDP; the batch size is per GPU), then sharded inference.
set -euo pipefail
DATA=${DATA:-data}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
handseg kfold --data "$DATA/train" --folds 5 -o splits.json --overwrite
torchrun --nproc_per_node "$GPUS" -m handseg train --data "$DATA/train" --splits splits.json --fold 0 \
  --arch unetplusplus --encoder hrnet_w48 --size 2048 --batch-size 2 --amp auto --epochs 60 --out runs/hr48_2048
torchrun --nproc_per_node "$GPUS" -m handseg predict runs/hr48_2048 --data "$DATA/test" -o pred_2048.csv
