# Two entry points for a fresh machine:  make demo  and  make test.
# Each creates its own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel of torch; an unpinned torch may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/hybridpk demo

# Two workers (pytest-xdist), one test file each at a time and one torch thread each: the 2 cores of CI.
test: $(BIN)/.installed
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build dist .pytest_cache
