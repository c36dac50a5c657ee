# The two commands a newcomer needs on a fresh machine:
#   make demo   sets up a headless ComfyUI (or uses COMFYUI=/path/to/ComfyUI), queues an example workflow,
#               and prints the folder the images were written to
#   make test   sets up the pinned host, runs ruff and the whole test suite
PYTHON ?= python3
VENV_PY := .host/venv/bin/python
WORKFLOW ?= example_workflows/face0_single_photo.json
COMFYUI ?=
COMFY_PYTHON ?=

.PHONY: host demo test lint bench

host:
	bash scripts/setup_host.sh

demo: host
	$(VENV_PY) -P scripts/demo.py --workflow $(WORKFLOW) $(if $(COMFYUI),--comfyui $(COMFYUI)) \
		$(if $(COMFY_PYTHON),--python $(COMFY_PYTHON))

lint: host
	$(VENV_PY) -P -m ruff check .

test: lint
	$(VENV_PY) -P -m pytest -ra $(PYTEST_ARGS)

bench: host
	for b in bench/bench_*.py; do $(VENV_PY) -P $$b || exit 1; done
