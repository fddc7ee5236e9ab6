# Two commands for a new user (see README.md):
#   make demo   set up the virtual environment and run the main demo
#   make test   set up the virtual environment and run the tests
# The CPU wheel of torch is installed first so that pip does not pull several GB of CUDA packages;
# override it for a GPU machine, e.g.  make test TORCH_SPEC="torch==2.13.0 --index-url <your index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the demo trains shorter than the full config so that all of it fits in about 10 minutes on 2 cores
DEMO_ARGS ?= train.steps=1500
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# openpi-client pins numpy < 2: the real client (tests/test_serving.py) runs in its own small venv
OPENPI_VENV ?= .venv-openpi
OPENPI_STAMP := $(OPENPI_VENV)/.installed

.PHONY: setup demo toy test bench gpu-check gpu-check-system gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# mujoco 4 splits into mujoco-core / mujoco-studio, whose files survive a downgrade to metaworld's
	# mujoco==3.3.0 and break `import mujoco`: remove them first (a no-op on a fresh venv)
	$(PY) -m pip uninstall --quiet --yes mujoco-core mujoco-studio 2>/dev/null || true
	$(PY) -m pip install --quiet -e ".[test,vl,mujoco,serve,metaworld]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/pipeline.py --config configs/point_obstacle.yaml --out runs/demo --overwrite $(DEMO_ARGS)

toy: $(STAMP)
	$(PY) scripts/demo_toy.py

$(OPENPI_STAMP):
	$(PYTHON) -m venv $(OPENPI_VENV)
	$(OPENPI_VENV)/bin/python -m pip install --quiet openpi-client==0.1.2 typing_extensions
	touch $(OPENPI_STAMP)

test: $(STAMP) $(OPENPI_STAMP)
	OPENPI_CLIENT_PYTHON=$(OPENPI_VENV)/bin/python $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) scripts/bench.py

# on a CUDA machine, in at most 8 minutes: the CUDA tests, bench.py --device cuda and a short FPO run
# -> runs/gpu_check/gpu_check.json + .md (a table). Set up with a CUDA build of torch first, e.g.
#   make gpu-check TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
# (an existing .venv with the CPU wheel must be removed first: make clean). Exits 2 without CUDA.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

# the same on a machine whose own python already has a CUDA torch and no network to build .venv from
# (the lent GPU machines): runs from the source tree; gymnasium, einops, torchdiffeq, safetensors, pyyaml,
# pyarrow and transformers must be importable there (docs/benchmarks/h200-2026-11-30 carried gymnasium
# as a wheel). GPU_PYTHON picks the interpreter.
GPU_PYTHON ?= python3
gpu-check-system:
	mkdir -p .gpu_path && ln -sfn ../envs .gpu_path/fmpolicy_envs
	PYTHONPATH=$(CURDIR):$(CURDIR)/.gpu_path$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) scripts/gpu_check.py

# here, before a GPU session: wheels for the GPU machine's python (3.12 on the lent machines) of what its
# image lacks for the serving benchmark (the server's websockets and msgpack, openpi-client and its
# imports), from the local package index; scripts/gpu_round.sh unpacks them there (carry .gpu_wheels)
GPU_PY_VERSION ?= 3.12
GPU_WHEELS = msgpack websockets openpi-client==0.1.2 dm-tree typing_extensions pillow attrs wrapt absl-py
gpu-wheels: $(STAMP)
	rm -rf .gpu_wheels
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY_VERSION) \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu_wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(OPENPI_VENV) build *.egg-info
