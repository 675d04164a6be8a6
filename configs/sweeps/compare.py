"""The model comparison: every model family on the same data, one table.

  python -m sentiment_jax.sweep --sweep=configs/sweeps/compare.py:quick --workdir=runs/compare_quick
  python -m sentiment_jax.sweep --sweep=configs/sweeps/compare.py:full --workdir=runs/compare

quick: 2,000-example subsets of each IMDB split, 200 tokens, 2 epochs (minutes on a CPU).
full:  all of IMDB with each model's own config file unchanged.
"""

from sentiment_jax.sweep import QUICK_SET as QUICK

MODELS = [
    {"name": "lstm", "config": "configs/lstm.py"},
    {"name": "bilstm_attention", "config": "configs/bilstm_attention.py"},
    {"name": "transformer", "config": "configs/transformer.py"},
    {"name": "simple_rnn", "config": "configs/rnn.py"},
    {"name": "verbalizer", "config": "configs/verbalizer.py"},  # needs the MiniLM wheel, see setup.py
]


def get_sweep(preset: str = "quick"):
    if preset not in ("quick", "full"):
        raise ValueError(f"unknown preset '{preset}' of configs/sweeps/compare.py; choose quick or full")
    return {"variants": MODELS, "set": QUICK if preset == "quick" else {}, "seeds": [0]}
