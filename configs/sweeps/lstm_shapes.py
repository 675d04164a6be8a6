"""How depth, width and direction change an LSTM: 1-3 layers, two widths, uni- vs bidirectional.

  python -m sentiment_jax.sweep --sweep=configs/sweeps/lstm_shapes.py:quick --workdir=runs/shapes_quick
  python -m sentiment_jax.sweep --sweep=configs/sweeps/lstm_shapes.py:full --workdir=runs/shapes --seeds=0,1,2

Starts from configs/stacked_lstm.py (the last layer's final state is the text vector, as in
the notebooks this study comes from) and crosses layer sizes with direction.
"""

from presets import QUICK


def get_sweep(preset: str = "quick"):
    if preset not in ("quick", "full"):
        raise ValueError(f"unknown preset '{preset}' of configs/sweeps/lstm_shapes.py; choose quick or full")
    return {
        "config": "configs/stacked_lstm.py",
        "set": QUICK if preset == "quick" else {},
        "grid": {
            "model.hidden_sizes": [(64,), (64, 32), (128, 64), (64, 32, 16)],
            "model.bidirectional": [False, True],
        },
        "seeds": [0],
    }
