#!/bin/sh
# Entry point of the veorl images: `docker run IMAGE <command> [arguments...]`.
# A component name runs that component (`docker run IMAGE ingest --source s3://videos/raw --out /app/work/clips`
# is `python -m components.ingest --source s3://videos/raw --out /app/work/clips`); anything else runs as given,
# so `docker run IMAGE python ...` and `bash` work. Kubeflow sets the container command itself and bypasses this.
set -eu

usage() {
  cat <<'USAGE'
usage: docker run IMAGE COMMAND [ARGS...]

commands (each takes --help):
  source-videos  render unlabeled source videos            (python -m components.source_videos)
  ingest         decode, resize and window videos to clips (python -m components.ingest)
  collect        collect the offline target dataset        (python -m components.collect)
  pretrain       pretrain the video world model            (python -m components.pretrain)
  finetune       train the agent (Trunk Net + policy)      (python -m components.finetune)
  evaluate       evaluate an agent in the simulator        (python -m components.evaluate)
  register       register and promote in MLflow            (python -m components.register)
  pipeline       compile/submit the Kubeflow pipeline      (python -m pipelines.cli)
  anything else  runs as given (python, bash, dvc, mlflow, ...)
USAGE
}

command="${1:-}"
case "$command" in
  source-videos|source_videos) module=components.source_videos ;;
  ingest) module=components.ingest ;;
  collect) module=components.collect ;;
  pretrain) module=components.pretrain ;;
  finetune) module=components.finetune ;;
  evaluate) module=components.evaluate ;;
  register) module=components.register ;;
  pipeline) module=pipelines.cli ;;
  ""|-h|--help|help) usage; exit 0 ;;
  *) exec "$@" ;;
esac
shift
exec python -m "$module" "$@"
