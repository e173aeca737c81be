#!/usr/bin/env bash
# The laptop-preset comparison behind docs/results.md: VeoRL, offline DreamerV2 and behaviour cloning over seeds on
# one target task, plus VeoRL's ablations, in two one-thread lanes so both cores of a 2-core machine work.
#
#   bash scripts/laptop_comparison.sh [TASK] [OUT]        (defaults: drawer-open, results/laptop-TASK)
#
# Re-running resumes: finished runs are skipped and interrupted ones continue from their checkpoints.
# The last step writes docs/results.md from whatever has finished (scripts/compare.py --report-only);
# NOTES (default docs/results_notes.md) is appended as the observations.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TASK=${1:-drawer-open}
OUT=${2:-results/laptop-$TASK}
NOTES=${NOTES:-docs/results_notes.md}
PY=${PYTHON:-$REPO/.venv/bin/python}
mkdir -p "$OUT"
sed -e 's/^preset: .*/preset: laptop/' -e "s/^  task: .*/  task: $TASK/" params.yaml > "$OUT/params.yaml"
cd "$OUT"
export PYTHONPATH=$REPO MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlruns.db}
t0=$(date +%s)
stamp() { echo "$1 $(($(date +%s) - t0))" >> times.txt; }

[ -f data/source_videos/provenance.json ] || { $PY -m components.source_videos --params params.yaml --out data/source_videos; stamp source_videos; }
[ -f data/video_clips/manifest.json ] || { $PY -m components.ingest --params params.yaml --source data/source_videos --out data/video_clips; stamp ingest; }
[ -f data/target_episodes/card.json ] || { $PY -m components.collect --params params.yaml --out data/target_episodes; stamp collect; }

CMP=("$PY" "$REPO/scripts/compare.py" --params params.yaml --world-model models/world_model
     --episodes data/target_episodes --clips data/video_clips --set evaluate.workers=1)
lane() {  # NAME RESULTS ARGS...: one compare.py invocation, its own document (the shared one is written at the end)
  local name=$1 results=$2
  shift 2
  "${CMP[@]}" --results "$results" --doc "$results/$name.md" --figure "$results/$name.png" "$@" >> "$name.log" 2>&1 || true
  stamp "$name"
}
set +e
# Lane B: behaviour cloning needs no world model, so it starts at once; then DreamerV2 seeds and two ablations.
(
  lane lane_b_bc compare --algos bc --seeds 0 1 2
  while [ ! -f models/world_model/world_model.pt ]; do sleep 20; done
  lane lane_b_dreamerv2 compare --algos dreamerv2 --seeds 1 2
  lane ablation_no_intrinsic ablations/no_intrinsic --algos veorl --seeds 0 --set finetune.use_intrinsic=false
  lane ablation_no_latent_action ablations/no_latent_action --algos veorl --seeds 0 \
    --set finetune.use_latent_action=false
) &
# Lane A: pretraining, then VeoRL seeds and DreamerV2 seed 0; then the last two ablations.
$PY -m components.pretrain --params params.yaml --clips data/video_clips --episodes data/target_episodes \
  --out models/world_model --checkpoints checkpoints/pretrain --metrics metrics/pretrain.json \
  --curve metrics/pretrain_curve.csv >> pretrain.log 2>&1
stamp pretrain
lane lane_a_seed0 compare --algos veorl dreamerv2 --seeds 0
lane lane_a_veorl compare --algos veorl --seeds 1 2
# (The "no video" ablation, VeoRL without encoder, MMD, latent actions or intrinsic reward, is algo=dreamerv2.)
lane ablation_no_uncertainty ablations/no_uncertainty --algos veorl --seeds 0 --set finetune.ensemble_size=0
wait
set -e
cd "$REPO"
"$PY" scripts/compare.py --params "$OUT/params.yaml" --world-model "$OUT/models/world_model" \
  --episodes "$OUT/data/target_episodes" --clips "$OUT/data/video_clips" --results "$OUT/compare" \
  --set evaluate.workers=1 --algos veorl dreamerv2 bc --seeds 0 1 2 --report-only --notes "$NOTES"
