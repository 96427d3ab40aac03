#!/usr/bin/env bash
# The recipe of the shipped default model (models/README.md): render the data, then train.
# Usage: models/train_default.sh OUT_DIR [more models.train flags, e.g. --device cuda]
set -euo pipefail
out=${1:?usage: models/train_default.sh OUT_DIR [train flags]}
shift
data=${DATA_DIR:-data/shapes}
"${PYTHON:-python}" -m models.synthetic --out "$data" --train "${TRAIN_IMAGES:-10000}" --val 500 --seed 0 \
  --workers "$(nproc)"
"${PYTHON:-python}" -m models.train --data "$data/train" --out "$out" --variant n --input-size 320 "$@"
