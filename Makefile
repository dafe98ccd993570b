# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# torch is installed first and pinned, so that pip never swaps in a multi-GB CUDA build on a CPU machine.
# Any torch >= 2.4 already in the venv is kept.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.dgg-installed
# verl pins transformers and tensordict, and its FSDP engine imports TRL when TRL is present, so the verl
# adapter is tested in an environment of its own, on verl's real actor update loop (CPU, gloo; tests_verl/).
VENV_VERL  ?= .venv-verl
STAMP_VERL := $(VENV_VERL)/.dgg-installed

.PHONY: demo test test-verl install lint clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 4))" 2>/dev/null \
		|| $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dgg demo

test: $(STAMP) $(STAMP_VERL)
	$(PY) -m pytest -q
	$(VENV_VERL)/bin/python -m pytest -q -p no:cacheprovider tests_verl

$(STAMP_VERL): pyproject.toml
	test -x $(VENV_VERL)/bin/python || python3 -m venv $(VENV_VERL)
	$(VENV_VERL)/bin/python -m pip install -q "$(TORCH)"
	$(VENV_VERL)/bin/python -m pip install -q -e ".[verl]" "pytest>=8"
	@touch $(STAMP_VERL)

test-verl: $(STAMP_VERL)
	$(VENV_VERL)/bin/python -m pytest -q -p no:cacheprovider tests_verl

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tests_verl

clean:
	rm -rf runs/demo .pytest_cache
