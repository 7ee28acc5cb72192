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

.PHONY: install test test-fast lint format bench train clean

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
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# bench: writes bench/out/ and copies bench/out/README_table.md between the README's bench markers.
bench: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m bench --splice README.md

train: $(STAMP)
	$(PY) -m vppo.train

clean:
	rm -rf .pytest_cache .ruff_cache bench/out
