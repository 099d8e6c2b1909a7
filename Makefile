# dsub: make install | make test | make demo | make slurm-up / slurm-down (a local SLURM for tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo clean slurm-up slurm-down

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/dsub demo -o demo_out

clean:
	rm -rf demo_out .pytest_cache

slurm-up:
	bash cluster/local-slurm/up.sh

slurm-down:
	bash cluster/local-slurm/down.sh
