# The two commands a newcomer needs on a fresh machine:
#   make demo   sets up a headless ComfyUI (or uses COMFYUI=/path/to/ComfyUI), queues an example workflow,
#               and prints the folder the images were written to
#   make test   sets up the pinned hosts, runs ruff and the whole test suite on ComfyUI 0.3.75, then on 0.28
# HOST picks the host for demo and bench: .host (ComfyUI 0.3.75, default) or .host/comfyui-0.28.
PYTHON ?= python3
HOST ?= .host
VENV_PY := $(HOST)/venv/bin/python
WORKFLOW ?= example_workflows/face0_single_photo.json
COMFYUI ?=
COMFY_PYTHON ?=

.PHONY: host demo test lint bench

host:
	bash scripts/setup_host.sh

demo: host
	FACECOND_HOST=$(abspath $(HOST)) $(VENV_PY) -P scripts/demo.py --workflow $(WORKFLOW) $(if $(COMFYUI),--comfyui $(COMFYUI)) \
		$(if $(COMFY_PYTHON),--python $(COMFY_PYTHON))

lint: host
	$(VENV_PY) -P -m ruff check .

test: lint
	bash scripts/test_hosts.sh $(PYTEST_ARGS)

bench: host
	for b in bench/bench_*.py; do FACECOND_HOST=$(abspath $(HOST)) $(VENV_PY) -P $$b || exit 1; done
