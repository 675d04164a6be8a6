"""One model on all 12 NusaX-Senti languages, 3 seeds each: the table behind the 12-language average.

  python -m sentiment_jax.sweep --sweep=configs/sweeps/nusax_languages.py:fasttext --workdir=runs/nusax_fasttext
  python -m sentiment_jax.sweep --sweep=configs/sweeps/nusax_languages.py:transformer --workdir=runs/nusax_transformer
  python -m sentiment_jax.sweep --sweep=configs/sweeps/nusax_languages.py:nb_linear --workdir=runs/nusax_nb_linear

The preset names a model config (`configs/PRESET.py`, its `nusax` variant). Each run keeps
its best-validation-macro-F1 checkpoint and reports test macro-F1 from it.
"""

from sentiment_jax.data import NUSAX_LANGUAGES


def get_sweep(preset: str = "fasttext"):
    return {"config": f"configs/{preset}.py:nusax", "grid": {"data.language": list(NUSAX_LANGUAGES)},
            "seeds": [0, 1, 2], "compare": False}
