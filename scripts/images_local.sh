#!/usr/bin/env bash
# Builds the CPU image on a machine that reaches no container registry (and perhaps not the PyTorch index):
#   bash scripts/images_local.sh          build (what `make images-local` runs); idempotent, seconds when cached
#   bash scripts/images_local.sh stop     stop the Docker daemon this script started (by its PID file)
#
# What `build` does, each step only when needed (docs/cluster.md, "Building the images without a registry"):
#   1. a Docker engine: apt-get installs docker.io when there is none, and dockerd is started in the background
#      (PID file and log under $STATE) when no daemon answers; it keeps running after the build;
#   2. a base image without a registry: Debian bookworm minbase + python3 (3.11), debootstrapped from the Debian
#      mirror the host's apt uses, with the host's extra CA certificates, imported as $LOCAL_BASE;
#   3. torch: when pip finds a local CPU wheel of the pinned torch (pip's find-links), that wheel and its
#      dependencies are served as a PEP 503 index on 127.0.0.1 for the duration of the build;
#   4. `docker build --network=host -f docker/Dockerfile.cpu` (legacy builder), tagged $IMAGE.
#
# Environment (all optional): IMAGE (default localhost:5000/veorl:VERSION-cpu, the pipeline's default image),
# BASE_IMAGE (skip step 2, e.g. python:3.11-slim-bookworm from a mirror), TORCH_INDEX_URL (skip step 3),
# PIP_INDEX_URL, EXTRA_CA_CERTS (PEM text; default: the host's /usr/local/share/ca-certificates/*.crt),
# VEORL_CODE_VERSION, DEBIAN_MIRROR, DOCKER_DATA_ROOT (/var/lib/docker), VEORL_IMAGES_STATE (/var/lib/veorl-images),
# VEORL_TORCH_INDEX_PORT (38471; a fixed port keeps the dependency layer cached).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[images-local] %s\n' "$*"; }
die() {
  printf '[images-local] error: %s\n' "$*" >&2
  exit 1
}
need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root: run this script as root, or $2"; }
now() { date +%s; }

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' src/veorl/__init__.py)
IMAGE=${IMAGE:-localhost:5000/veorl:${VERSION}-cpu}
LOCAL_BASE=local/debian-python:3.11-bookworm
if [ "$(id -u)" = 0 ]; then STATE=${VEORL_IMAGES_STATE:-/var/lib/veorl-images}; else
  STATE=${VEORL_IMAGES_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/veorl-images}
fi
DOCKERD_PIDFILE=$STATE/dockerd.pid
DOCKERD_LOG=$STATE/dockerd.log
DOCKER_DATA_ROOT=${DOCKER_DATA_ROOT:-/var/lib/docker}
DOCKER_EXEC_ROOT=${DOCKER_EXEC_ROOT:-/var/run/docker}
INDEX_PORT=${VEORL_TORCH_INDEX_PORT:-38471}
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

docker_answers() { docker info >/dev/null 2>&1; }

ensure_commands() { # command:package ...
  local pair missing=()
  for pair; do command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root "installing ${missing[*]}" "install them yourself"
  log "installing ${missing[*]} with apt-get (about 20 s)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$STATE/apt.log" 2>&1 ||
    die "apt-get install ${missing[*]} failed; see $STATE/apt.log"
}

daemon_pid() { # the PID of the dockerd this script started, if it is alive
  local pid
  [ -f "$DOCKERD_PIDFILE" ] && pid=$(cat "$DOCKERD_PIDFILE") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
    echo "$pid"
}

ensure_daemon() {
  if docker_answers; then
    log "Docker daemon: answering (server $(docker version -f '{{.Server.Version}}' 2>/dev/null))"
    return
  fi
  ensure_commands docker:docker.io dockerd:docker.io
  docker_answers && return
  need_root "starting dockerd" "start a Docker daemon yourself"
  if [ -z "$(daemon_pid)" ]; then
    log "starting dockerd in the background (data root $DOCKER_DATA_ROOT, log $DOCKERD_LOG)"
    setsid dockerd --data-root "$DOCKER_DATA_ROOT" --exec-root "$DOCKER_EXEC_ROOT" --pidfile "$DOCKERD_PIDFILE" \
      >>"$DOCKERD_LOG" 2>&1 </dev/null &
  fi
  local i
  for i in $(seq 1 60); do
    docker_answers && break
    if [ "$i" -gt 3 ] && [ -z "$(daemon_pid)" ] && ! pgrep -x dockerd >/dev/null; then
      tail -n 20 "$DOCKERD_LOG" >&2 || true
      die "dockerd exited; see $DOCKERD_LOG"
    fi
    sleep 1
  done
  docker_answers || die "dockerd does not answer after 60 s; see $DOCKERD_LOG"
  log "Docker daemon: started (PID $(daemon_pid), server $(docker version -f '{{.Server.Version}}'))"
}

stop_daemon() {
  local pid i
  pid=$(daemon_pid) || true
  if [ -z "$pid" ]; then
    log "no dockerd started by this script is running (PID file $DOCKERD_PIDFILE)"
    return
  fi
  log "stopping dockerd (PID $pid)"
  kill "$pid"
  for i in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || {
      log "dockerd stopped"
      return
    }
    sleep 1
  done
  die "dockerd (PID $pid) still runs after 30 s"
}

debian_mirror() { # the Debian mirror the host's apt uses (deb822 .sources or one-line .list), else deb.debian.org
  local uri
  uri=$(
    {
      grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
      grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
        awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}'
    } | grep -E '/debian/?$' | head -n 1
  ) || true
  echo "${uri:-http://deb.debian.org/debian}"
}

ensure_base() {
  if [ -n "${BASE_IMAGE:-}" ]; then
    log "base image: $BASE_IMAGE (given)"
    return
  fi
  BASE_IMAGE=$LOCAL_BASE
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image: $BASE_IMAGE (present)"
    return
  fi
  ensure_commands debootstrap:debootstrap
  need_root "debootstrap" "pass BASE_IMAGE=<an image with Debian bookworm and Python 3.11>"
  local mirror rootfs start crt
  mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
  rootfs=$STATE/rootfs
  start=$(now)
  log "base image: debootstrapping Debian bookworm (minbase, python3) from $mirror (about a minute)"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 || {
    tail -n 20 "$STATE/debootstrap.log" >&2
    die "debootstrap failed; see $STATE/debootstrap.log"
  }
  # HTTPS to the package indexes may go through a proxy that re-signs certificates: trust the host's extra CAs.
  for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$crt" ] && cp "$crt" "$rootfs/usr/local/share/ca-certificates/"
  done
  chroot "$rootfs" update-ca-certificates >/dev/null
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  log "base image: $BASE_IMAGE imported ($(($(now) - start)) s)"
}

INDEX_SERVER_PID=
stop_index() {
  if [ -n "$INDEX_SERVER_PID" ] && kill -0 "$INDEX_SERVER_PID" 2>/dev/null; then
    kill "$INDEX_SERVER_PID" 2>/dev/null || true
    wait "$INDEX_SERVER_PID" 2>/dev/null || true
    log "torch index server (PID $INDEX_SERVER_PID) stopped"
  fi
  INDEX_SERVER_PID=
}

port_free() { # as http.server binds: with SO_REUSEADDR, so the last build's connections in TIME_WAIT do not count
  "$PY" - "$1" 2>/dev/null <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
PY
}

serve_torch_index() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    log "torch: from $TORCH_INDEX_URL (given)"
    return
  fi
  local requirement wheels index stamp target whl name project i
  requirement=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
  wheels=$STATE/torch-wheels
  index=$STATE/torch-index
  stamp=$wheels/.complete-$requirement
  # The image's interpreter, whatever runs this script: CPython 3.11 on x86-64 Linux.
  target=(--only-binary=:all: --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64)
  mkdir -p "$wheels"
  if [ ! -f "$stamp" ]; then
    if ! "$PY" -m pip download -q --no-deps --no-index "${target[@]}" -d "$wheels" "$requirement" >/dev/null 2>&1 ||
      ! compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then
      log "torch: no local CPU wheel of $requirement in pip's find-links; the build uses the Dockerfile's index"
      return
    fi
    log "torch: local CPU wheel found; downloading its dependencies"
    "$PY" -m pip download -q "${target[@]}" -d "$wheels" "$requirement" >"$STATE/pip-download.log" 2>&1 ||
      die "pip download $requirement failed; see $STATE/pip-download.log"
    touch "$stamp"
  fi
  rm -rf "$index"
  for whl in "$wheels"/*.whl; do # PEP 503: <index>/<normalised project name>/<file>
    name=$(basename "$whl")
    project=$(echo "${name%%-*}" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g')
    mkdir -p "$index/$project"
    ln -f "$whl" "$index/$project/$name" 2>/dev/null || cp "$whl" "$index/$project/$name"
  done
  if ! port_free "$INDEX_PORT"; then
    INDEX_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log "torch: port ${VEORL_TORCH_INDEX_PORT:-38471} is taken; using $INDEX_PORT (the dependency layer rebuilds)"
  fi
  "$PY" -m http.server "$INDEX_PORT" --bind 127.0.0.1 --directory "$index" >"$STATE/torch-index.log" 2>&1 &
  INDEX_SERVER_PID=$!
  trap stop_index EXIT
  TORCH_INDEX_URL=http://127.0.0.1:$INDEX_PORT/
  for i in $(seq 1 50); do
    curl -fsS -o /dev/null "$TORCH_INDEX_URL" 2>/dev/null && break
    kill -0 "$INDEX_SERVER_PID" 2>/dev/null || die "the torch index server exited; see $STATE/torch-index.log"
    sleep 0.2
  done
  log "torch: serving $(ls "$wheels"/*.whl | wc -l) wheels from $index at $TORCH_INDEX_URL (PID $INDEX_SERVER_PID)"
}

build() {
  local start args certs crt
  start=$(now)
  mkdir -p "$STATE"
  ensure_daemon
  ensure_base
  serve_torch_index
  args=(--network=host -f docker/Dockerfile.cpu --build-arg "BASE_IMAGE=$BASE_IMAGE")
  args+=(--build-arg "VEORL_CODE_VERSION=${VEORL_CODE_VERSION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}")
  [ -n "${TORCH_INDEX_URL:-}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  [ -n "${PIP_INDEX_URL:-}" ] && args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
  if [ -n "${EXTRA_CA_CERTS+set}" ]; then
    certs=$EXTRA_CA_CERTS
  else
    certs=
    for crt in /usr/local/share/ca-certificates/*.crt; do [ -f "$crt" ] && certs+=$(cat "$crt")$'\n'; done
  fi
  [ -n "$certs" ] && args+=(--build-arg "EXTRA_CA_CERTS=$certs")
  log "building $IMAGE (docker build --network=host -f docker/Dockerfile.cpu; cold: a few minutes)"
  local build_start=$(now)
  # The legacy builder: Docker 20.10 from Debian has no buildx, and the Dockerfiles need nothing BuildKit adds.
  DOCKER_BUILDKIT=0 docker build "${args[@]}" --label veorl.images-local=1 -t "$IMAGE" . ||
    die "docker build failed (output above)"
  local build_s=$(($(now) - build_start))
  stop_index
  # Earlier builds of this script that no tag points to any more (after a dependency change, 2 GB of them).
  docker image prune -f --filter label=veorl.images-local=1 |
    sed -n 's/^Total reclaimed space: \(.*\)/[images-local] earlier builds removed (\1)/p'
  local torch_version size
  torch_version=$(docker run --rm --entrypoint python "$IMAGE" -c 'import torch; print(torch.__version__)') ||
    die "$IMAGE does not start"
  size=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')
  log "built $IMAGE: torch $torch_version, $size, docker build ${build_s} s, all $(($(now) - start)) s"
  local pid
  pid=$(daemon_pid) || true
  if [ -n "$pid" ]; then
    log "dockerd (PID $pid) keeps running for docker run and pytest -m containers;" \
      "stop it with: bash scripts/images_local.sh stop"
  fi
}

case "${1:-build}" in
  build) build ;;
  stop) stop_daemon ;;
  *) die "usage: $0 [build|stop]" ;;
esac
