"""The stacked-LSTM study as config only: 1-3 layers of 64/32/16 units, uni- or bidirectional.

  python -m sentiment_jax.main --config=configs/stacked_lstm.py:3-bi --workdir=runs/lstm_3bi
Variant `LAYERS-DIRECTION`, LAYERS in 1, 2, 3 and DIRECTION in uni, bi. Mixed directions
per layer: --config.model.bidirectional='(True,False,False)'.
"""

from sentiment_jax.config_base import base_config


def get_config(variant: str = "2-bi"):
    layers, _, direction = variant.partition("-")
    if layers not in ("1", "2", "3") or direction not in ("uni", "bi"):
        raise ValueError(f"unknown variant '{variant}' of configs/stacked_lstm.py; "
                         "choose LAYERS-DIRECTION with LAYERS 1, 2 or 3 and DIRECTION uni or bi, e.g. 3-bi")
    c = base_config()
    c.model.name = "lstm"
    c.model.embed_dim = 128
    c.model.hidden_sizes = (64, 32, 16)[:int(layers)]
    c.model.bidirectional = direction == "bi"
    c.model.pooling = "last"
    c.model.dropout = 0.2
    c.data.bucket_width = 50
    return c
