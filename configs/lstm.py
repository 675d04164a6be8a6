"""BiLSTM sentiment classifier.

  python -m sentiment_jax.main --config=configs/lstm.py --workdir=runs/lstm          # IMDB
  python -m sentiment_jax.main --config=configs/lstm.py:nusax --workdir=runs/nusax   # NusaX-Senti
  python -m sentiment_jax.main --config=configs/lstm.py:imdb,fsdp --workdir=runs/fsdp # a mesh layout
"""

from sentiment_jax.config_base import base_config, variant_data


def get_config(variant: str = "imdb"):
    c = base_config()
    c.model.name = "lstm"
    c.model.embed_dim = 128
    c.model.hidden_sizes = (128,)
    c.model.bidirectional = True
    c.model.pooling = "mean_max"
    c.model.dropout = 0.3
    c.model.embed_dropout = 0.25  # curbs the epoch-2 overfitting seen without it
    c.data.bucket_width = 50
    return variant_data(c, variant, "configs/lstm.py")
