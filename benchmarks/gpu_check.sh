#!/usr/bin/env bash
# The GPU path checked in one command (benchmarks/gpu_check.py says what it runs; docs/scaling.md § GPU check):
#   benchmarks/gpu_check.sh [--out=gpu_check.json] [--sections=tests,throughput,imdb,verbalizer]
# Uses the Python on PATH (or $PYTHON), which must already have JAX with its CUDA plugin and PyTorch.
# Packages it lacks are installed offline from the wheels in benchmarks/wheels into a folder of their own.
# IMDB is read from $SENTIMENT_JAX_DATA (default: ../shared/data beside this checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
export SENTIMENT_JAX_DATA="${SENTIMENT_JAX_DATA:-$(cd .. && pwd)/shared/data}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --wheels=benchmarks/wheels "$@"
