#!/usr/bin/env bash
# Installs everything veorl needs into ./.venv (idempotent; a second run takes seconds).
# System: the Mesa EGL libraries MuJoCo renders with headless (Debian/Ubuntu; skipped when present or not root).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if ! ldconfig -p 2>/dev/null | grep -q "libEGL_mesa.so"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[bootstrap] installing Mesa EGL for headless MuJoCo rendering"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri >/dev/null
  else
    echo "[bootstrap] warning: libEGL_mesa not found; Meta-World rendering needs libegl1 libegl-mesa0 libgl1-mesa-dri" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $PY"
  "$PY" -m venv .venv
  .venv/bin/pip install -q -U pip
fi
stamp=.venv/.veorl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] installing veorl and its pinned dependencies (first time: about 2 minutes)"
  .venv/bin/pip install -q -e ".[envs,dev,cluster]"
  touch "$stamp"
fi
# DVC needs a git repository (the checkout) and its own config, which is committed in .dvc/.
.venv/bin/dvc config core.analytics false >/dev/null 2>&1 || true
echo "[bootstrap] ready: .venv"
