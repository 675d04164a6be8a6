"""SimpleRNN (h = tanh(x W + h U + b)): the baseline the gated cells improve on.

  python -m sentiment_jax.main --config=configs/rnn.py --workdir=runs/rnn
  python -m sentiment_jax.main --config=configs/rnn.py:nusax --workdir=runs/rnn_id
The GRU uses the same machinery: --config.model.name=gru.
"""

from sentiment_jax.config_base import base_config, variant_data


def get_config(variant: str = "imdb"):
    c = base_config()
    c.model.name = "rnn"
    c.model.embed_dim = 128
    c.model.hidden_sizes = (64,)
    c.model.bidirectional = True
    c.model.pooling = "mean_max"  # the last state of a SimpleRNN forgets most of a long review
    c.model.dropout = 0.3
    c.data.bucket_width = 50
    return variant_data(c, variant, "configs/rnn.py")
