# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# torch is installed first and pinned, so that pip never swaps in a multi-GB CUDA build on a CPU machine.
# Any torch >= 2.4 already in the venv is kept.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.dgg-installed

.PHONY: demo test install lint clean

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

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf runs/demo .pytest_cache
