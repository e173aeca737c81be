#!/usr/bin/env bash
# The k-step BAN measurement behind docs/method.md (model.ban_horizon): pretrain the video world model of a laptop
# comparison again with each BAN horizon k, on the same data, and print the codebook diagnostics of each next to
# the comparison's own world model (k = 1).
#
#   bash scripts/ban_horizon.sh [COMPARISON] [K ...]   (defaults: results/laptop-drawer-open, k = 2 4)
#
# COMPARISON is the output folder of scripts/laptop_comparison.sh (its params.yaml, data and models/world_model).
# Each k trains one thread in fp32 into COMPARISON/ban-horizon/kK (about 8 min each on 2 shared cores); re-running
# resumes or skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CMP=${1:-results/laptop-drawer-open}
shift || true
KS=("$@")
[ ${#KS[@]} -gt 0 ] || KS=(2 4)
PY=${PYTHON:-$REPO/.venv/bin/python}
OUT=$CMP/ban-horizon
mkdir -p "$OUT"
export PYTHONPATH=$REPO/src:$REPO MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$REPO/$OUT/mlruns.db}
export OMP_NUM_THREADS=1
for k in "${KS[@]}"; do
  [ -f "$OUT/k$k/world_model/world_model.pt" ] && continue
  "$PY" -m components.pretrain --params "$CMP/params.yaml" --set pretrain.precision=fp32 --set "model.ban_horizon=$k" \
    --clips "$CMP/data/video_clips" --episodes "$CMP/data/target_episodes" --out "$OUT/k$k/world_model" \
    --checkpoints "$OUT/k$k/checkpoints" --metrics "$OUT/k$k/pretrain.json" --curve "$OUT/k$k/pretrain_curve.csv" \
    > "$OUT/k$k.log" 2>&1
done
"$PY" - "$CMP" "${KS[@]}" <<'PY'
import json
import sys
from pathlib import Path

cmp, ks = Path(sys.argv[1]), sys.argv[2:]
rows = [("1", cmp / "models/world_model")] + [(k, cmp / f"ban-horizon/k{k}/world_model") for k in ks]
keys = ["target_perplexity", "codes_per_sequence", "reversed_distinct", "static_distinct", "action_probe_r2"]
print("| k | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for k, folder in rows:
    book = json.loads((folder / "diagnostics.json").read_text())["codebook"]
    print(f"| {k} | " + " | ".join(f"{book[key]:.3f}" for key in keys) + " |")
PY
