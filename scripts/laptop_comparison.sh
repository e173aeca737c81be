#!/usr/bin/env bash
# The laptop-preset comparison behind one task's section of docs/results.md: VeoRL, offline DreamerV2 and behaviour
# cloning over three seeds on one target task, with learning curves, and (ABLATIONS=1) VeoRL's ablations, in two
# one-thread lanes so both cores of a 2-core machine work.
#
#   bash scripts/laptop_comparison.sh [TASK] [OUT]        (defaults: drawer-open, results/laptop-TASK)
#   ABLATIONS=0|1 bash scripts/laptop_comparison.sh ...   (default: 1 for drawer-open, else 0)
#   DOMAIN=driving bash scripts/laptop_comparison.sh highway       (the other domains: driving, game; TASK then
#   DOMAIN=game bash scripts/laptop_comparison.sh collect-wood     names one of that domain's target tasks)
#
# Lane A: pretraining, then veorl seeds 0 1 2. Lane B: bc seeds 0 1 2 (no world model needed, so it starts at once),
# then dreamerv2 seeds 0 1 2 once the world model exists. Main runs snapshot their agent every 500 updates (learning
# curves). With ABLATIONS=1, veorl seeds 0 1 2 without the intrinsic reward and without the latent-action input
# (lane B), and without the uncertainty penalty and with the release's MMD term in the Trunk Net (lane A); the "no
# video" ablation is the dreamerv2 row itself.
#
# The code run is the checkout holding this script (PYTHONPATH), so a frozen worktree can run a long comparison
# while the main checkout changes.
# Re-running resumes: finished runs are skipped and interrupted ones continue from their checkpoints; OUT/times.txt
# gets a stamp (seconds since the start of this invocation) after each step.
# The last steps write the sections TASK (and TASK-ablations) of docs/results.md from whatever has finished
# (scripts/compare.py --report-only); the rest of the document is kept. Observations come from
# docs/results_notes_TASK.md (and docs/results_notes_TASK-ablations.md) where they exist.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TASK=${1:-drawer-open}
OUT=${2:-results/laptop-$TASK}
DOMAIN=${DOMAIN:-manipulation}
if [ "$TASK" = drawer-open ]; then ABLATIONS=${ABLATIONS:-1}; else ABLATIONS=${ABLATIONS:-0}; fi
PY=${PYTHON:-$REPO/.venv/bin/python}
SNAPSHOT_EVERY=500
mkdir -p "$OUT"
sed -e 's/^preset: .*/preset: laptop/' -e "s/^domain: .*/domain: $DOMAIN/" -e "s/^  task: .*/  task: $TASK/" params.yaml > "$OUT/params.yaml"
cd "$OUT"
export PYTHONPATH=$REPO/src:$REPO MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlruns.db}
t0=$(date +%s)
stamp() { echo "$1 $(($(date +%s) - t0))" >> times.txt; }

[ -f data/source_videos/provenance.json ] || { $PY -m components.source_videos --params params.yaml --out data/source_videos; stamp source_videos; }
[ -f data/video_clips/manifest.json ] || { $PY -m components.ingest --params params.yaml --source data/source_videos --out data/video_clips; stamp ingest; }
[ -f data/target_episodes/card.json ] || { $PY -m components.collect --params params.yaml --out data/target_episodes; stamp collect; }

# fp32 throughout: the published runs were made in fp32, which also gives the same numbers on every CPU
# (precision auto would train in bf16 on CPUs with AVX512-BF16 or AMX).
FP32=(--set pretrain.precision=fp32 --set finetune.precision=fp32 --set evaluate.precision=fp32)
CMP=("$PY" "$REPO/scripts/compare.py" --params params.yaml --world-model models/world_model
     --episodes data/target_episodes --clips data/video_clips --set evaluate.workers=1 "${FP32[@]}")
lane() {  # NAME RESULTS ARGS...: one compare.py invocation, its own document (the shared one is written at the end)
  local name=$1 results=$2
  shift 2
  "${CMP[@]}" --results "$results" --doc "$results/$name.md" --figure "$results/$name.png" "$@" >> "$name.log" 2>&1 || true
  stamp "$name"
}
main_runs() { lane "$1" compare --snapshot-every "$SNAPSHOT_EVERY" --algos "$2" --seeds 0 1 2; }
ablation() {  # NAME OVERRIDE: veorl seeds 0 1 2 with one component switched off, into ablations/NAME
  lane "ablation_$1" "ablations/$1" --algos veorl --seeds 0 1 2 --set "$2"
}
rm -f pretrain.failed
set +e
# Lane B: behaviour cloning needs no world model, so it starts at once; then DreamerV2 and two ablations.
(
  main_runs lane_b_bc bc
  while [ ! -f models/world_model/world_model.pt ] && [ ! -f pretrain.failed ]; do sleep 20; done
  main_runs lane_b_dreamerv2 dreamerv2
  if [ "$ABLATIONS" = 1 ]; then
    ablation no_intrinsic finetune.use_intrinsic=false
    ablation no_latent_action finetune.use_latent_action=false
  fi
) &
# Lane A: pretraining, then the VeoRL seeds; then the last ablation.
$PY -m components.pretrain --params params.yaml "${FP32[@]}" --clips data/video_clips --episodes data/target_episodes \
  --out models/world_model --checkpoints checkpoints/pretrain --metrics metrics/pretrain.json \
  --curve metrics/pretrain_curve.csv >> pretrain.log 2>&1 || { echo "pretraining failed: see $OUT/pretrain.log" >&2; touch pretrain.failed; }
stamp pretrain
main_runs lane_a_veorl veorl
if [ "$ABLATIONS" = 1 ]; then
  ablation no_uncertainty finetune.ensemble_size=0
  ablation with_mmd finetune.use_mmd=true
fi
wait
set -e
cd "$REPO"
status=0
NOTES=()
[ -f "docs/results_notes_$TASK.md" ] && NOTES=(--notes "docs/results_notes_$TASK.md")
"$PY" scripts/compare.py --params "$OUT/params.yaml" --world-model "$OUT/models/world_model" \
  --episodes "$OUT/data/target_episodes" --clips "$OUT/data/video_clips" --results "$OUT/compare" \
  --set evaluate.workers=1 "${FP32[@]}" --snapshot-every "$SNAPSHOT_EVERY" --algos veorl dreamerv2 bc --seeds 0 1 2 --report-only \
  --section "$TASK" --doc docs/results.md --figure "docs/results_$TASK.png" ${NOTES[@]+"${NOTES[@]}"} || status=$?
if [ "$ABLATIONS" = 1 ]; then
  # Each row has its own overrides, so these runs are read without a staleness check (see compare.py --help).
  NOTES=()
  [ -f "docs/results_notes_$TASK-ablations.md" ] && NOTES=(--notes "docs/results_notes_$TASK-ablations.md")
  INTRO="VeoRL with one component switched off per row, three seeds each like the full agent of the comparison \
above: the intrinsic reward (\`finetune.use_intrinsic=false\`), the latent-action input of actor and \
critic (\`finetune.use_latent_action=false\`), the uncertainty penalty (\`finetune.ensemble_size=0\`); and with \
the release's MMD term in the Trunk Net's training (\`finetune.use_mmd=true\`). The \
\"no video\" row is offline DreamerV2, the dreamerv2 runs of the comparison above: VeoRL without any of its video \
components (no pretrained encoder, no latent actions, no intrinsic reward)."
  "$PY" scripts/compare.py --params "$OUT/params.yaml" --report-only --algos veorl --results "$OUT/ablations" \
    --section "$TASK-ablations" --doc docs/results.md --figure "docs/results_${TASK}_ablations.png" \
    --intro "$INTRO" \
    --ablation "veorl (full)=$OUT/compare" \
    --ablation "no intrinsic reward=$OUT/ablations/no_intrinsic" \
    --ablation "no latent-action input=$OUT/ablations/no_latent_action" \
    --ablation "no uncertainty penalty=$OUT/ablations/no_uncertainty" \
    --ablation "with the Trunk Net MMD term (release)=$OUT/ablations/with_mmd" \
    --ablation "no video (= dreamerv2)=$OUT/compare@dreamerv2" ${NOTES[@]+"${NOTES[@]}"} || status=$?
fi
exit "$status"
