#!/usr/bin/env bash
# The core alone (pyproject's dependencies, no extras, versions from the lock) in a fresh venv:
# no optional package comes along, a tiny NusaX training and a prediction work, and a
# feature outside the core answers with one line naming its extra.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
quiet() { "$@" > "$tmp/log" 2>&1 || { cat "$tmp/log"; echo "core only: failed: $*"; exit 1; }; }
quiet make -s install VENV="$tmp/venv"
py="$tmp/venv/bin/python"

"$py" - <<'PY'
import importlib.util
import sys

optional = ["fastapi", "uvicorn", "wandb", "datasets", "tokenizers", "safetensors", "flatbuffers",
            "huggingface_hub", "tensorflow_datasets", "torch", "transformers", "pandas", "pyarrow", "pytest"]
found = [m for m in optional if importlib.util.find_spec(m)]
sys.exit(f"core only: the core install also brought {found}" if found else 0)
PY

run="$tmp/run"
quiet "$py" -m sentiment_jax.main --config=configs/lstm.py:nusax --config.data.language=english \
    --config.train.epochs=1 --config.data.max_length=32 --config.data.tokenizer.vocab_size=500 \
    --config.model.embed_dim=8 --config.model.hidden_sizes=8, --config.checkpoint.async_save=False --workdir="$run"
test -s "$run/result.json"
quiet "$py" -m sentiment_jax.main --workdir="$run" --mode=predict "A gem of a film." "Dull and far too long."
[ "$(grep -c '"label"' "$tmp/log")" = 2 ] || { cat "$tmp/log"; echo "core only: expected 2 predictions"; exit 1; }

# A feature outside the core: exit status 2 and one line that names the extra.
expect_extra() {
    local extra=$1; shift
    if "$@" > /dev/null 2> "$tmp/err"; then echo "core only: '$*' ran without its extra"; exit 1; fi
    if [ "$(wc -l < "$tmp/err")" != 1 ] || ! grep -q "pip install 'sentiment_jax\[$extra\]'" "$tmp/err"; then
        echo "core only: '$*' without its extra printed:"; cat "$tmp/err"; exit 1
    fi
}
expect_extra serve "$py" -m sentiment_jax.serve --model=lstm="$run"
expect_extra export "$py" -m sentiment_jax.export --workdir="$run" --output="$tmp/export"
expect_extra wandb "$py" -m sentiment_jax.main --config=configs/lstm.py --config.train.wandb_project=demo \
    --workdir="$tmp/wandb"
expect_extra hf "$py" -m sentiment_jax.main --config=configs/lstm.py --config.data.name=huggingface \
    --config.data.hf_name=imdb --workdir="$tmp/hf"
echo "core only: install, train, predict and missing-extra errors ok"
