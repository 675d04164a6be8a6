# Two commands do all set-up on a fresh machine (Python 3.11):
#   make train   # venv + install + train configs/lstm.py on IMDB into runs/lstm
#   make test    # venv + install + the test suite
# IMDB is read from $SENTIMENT_JAX_DATA (default: ../shared/data beside this checkout, if present).

VENV ?= .venv
PY := $(VENV)/bin/python
SENTIMENT_JAX_DATA ?= $(abspath ../shared/data)
export SENTIMENT_JAX_DATA

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: install train test
install: $(VENV)/.installed

train: install
	$(PY) -m sentiment_jax.main --config=configs/lstm.py --workdir=runs/lstm

test: install
	$(PY) -m pytest tests -q -n 2 --dist loadfile
