# The two commands a newcomer needs on a fresh machine:
#   make demo   sets up the one headless ComfyUI it runs (HOST), or uses COMFYUI=/path/to/ComfyUI (read-only),
#               queues an example workflow (WORKFLOW=), shows ComfyUI's output, and says what the images are and
#               in which numbered folder under demo_output/ they are. MODELS= a models folder with real weights,
#               IMAGE= a face photo, SIZE=demo|full|auto.
#   make test   sets up the pinned hosts, runs ruff and the whole test suite on ComfyUI 0.3.75, then on 0.28
# HOST picks the host for demo and bench: .host (ComfyUI 0.3.75, default) or .host/comfyui-0.28.
PYTHON ?= python3
HOST ?= .host
VENV_PY := $(HOST)/venv/bin/python
# the one host `make demo` installs: scripts/setup_host.sh VERSION, into the folder HOST names
IS_028 := $(findstring comfyui-0.28,$(HOST))
DEMO_HOST_VERSION := $(if $(IS_028),0.28,0.3.75)
DEMO_HOST_ROOT := $(if $(IS_028),$(patsubst %/,%,$(dir $(abspath $(HOST)))),$(abspath $(HOST)))
WORKFLOW ?= example_workflows/face0_single_photo.json
COMFYUI ?=
COMFY_PYTHON ?=
MODELS ?=
IMAGE ?=
SIZE ?= auto
# the 25 slowest tests of each host in the log: where CI's minutes go
PYTEST_ARGS ?= --durations=25

.PHONY: host demo test lint bench

host:
	bash scripts/setup_host.sh

# exec: the demo replaces the recipe's shell, so the SIGTERM make passes on reaches it (it then stops ComfyUI and
# removes its temp folder)
demo:
	FACECOND_HOST_ROOT=$(DEMO_HOST_ROOT) bash scripts/setup_host.sh $(DEMO_HOST_VERSION)
	exec env FACECOND_HOST=$(abspath $(HOST)) $(VENV_PY) -P scripts/demo.py --workflow $(WORKFLOW) --size $(SIZE) \
		$(if $(COMFYUI),--comfyui $(COMFYUI)) $(if $(COMFY_PYTHON),--python $(COMFY_PYTHON)) \
		$(if $(MODELS),--models $(MODELS)) $(if $(IMAGE),--image $(IMAGE))

lint: host
	$(VENV_PY) -P -m ruff check .

test: lint
	bash scripts/test_hosts.sh $(PYTEST_ARGS)

bench: host
	for b in bench/bench_*.py; do FACECOND_HOST=$(abspath $(HOST)) $(VENV_PY) -P $$b || exit 1; done
