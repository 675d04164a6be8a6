"""The model comparison: every model family on the same data, one table.

  python -m sentiment_jax.sweep --sweep=configs/sweeps/compare.py:quick --workdir=runs/compare_quick
  python -m sentiment_jax.sweep --sweep=configs/sweeps/compare.py:full --workdir=runs/compare

quick: 2,000-example subsets of each IMDB split, 200 tokens, 2 epochs (minutes on a CPU).
full:  all of IMDB with each model's own config file unchanged.
"""

from presets import QUICK

MODELS = [
    {"name": "lstm", "config": "configs/lstm.py"},
    {"name": "bilstm_attention", "config": "configs/bilstm_attention.py"},
    {"name": "transformer", "config": "configs/transformer.py"},
    {"name": "simple_rnn", "config": "configs/rnn.py"},
    {"name": "verbalizer", "config": "configs/verbalizer.py"},  # needs the MiniLM wheel, see README.md
    {"name": "fasttext", "config": "configs/fasttext.py"},
    {"name": "nb_linear", "config": "configs/nb_linear.py"},
]
# The n-gram models count features, not words, in data.max_length (their config files scale it).
FEATURES_PER_WORD = {"fasttext": 16, "nb_linear": 3}


def get_sweep(preset: str = "quick"):
    if preset not in ("quick", "full"):
        raise ValueError(f"unknown preset '{preset}' of configs/sweeps/compare.py; choose quick or full")
    if preset == "full":
        return {"variants": MODELS, "seeds": [0]}
    variants = [{**m, "set": {"data.max_length": QUICK["data.max_length"] * FEATURES_PER_WORD[m["name"]]}}
                if m["name"] in FEATURES_PER_WORD else m for m in MODELS]
    return {"variants": variants, "set": QUICK, "seeds": [0]}
