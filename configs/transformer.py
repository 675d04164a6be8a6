"""Attention encoder: 2 pre-LayerNorm blocks over word embeddings with sinusoidal positions.

  python -m sentiment_jax.main --config=configs/transformer.py --workdir=runs/transformer          # IMDB
  python -m sentiment_jax.main --config=configs/transformer.py:nusax --workdir=runs/transformer_id
Options: --config.model.pooling=cls, --config.model.positions=learned.
"""

from sentiment_jax.config_base import base_config, variant_data


def get_config(variant: str = "imdb"):
    c = base_config()
    c.model.name = "transformer"
    c.model.embed_dim = 128
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.mlp_dim = 256
    c.model.positions = "sinusoidal"
    c.model.pooling = "mean"
    c.model.dropout = 0.1
    c.model.embed_dropout = 0.1
    c.train.learning_rate = 5e-4
    c.train.warmup_fraction = 0.1
    c.train.weight_decay = 0.01
    c.data.bucket_width = 50
    variant_data(c, variant, "configs/transformer.py")
    c.model.max_positions = c.data.max_length + 1  # room for the CLS token
    return c
