"""BiLSTM sentiment classifier.

  python -m sentiment_jax.main --config=configs/lstm.py --workdir=runs/lstm          # IMDB
  python -m sentiment_jax.main --config=configs/lstm.py:nusax --workdir=runs/nusax   # NusaX-Senti
  python -m sentiment_jax.main --config=configs/lstm.py:imdb,fsdp --workdir=runs/fsdp # a mesh layout
"""

from sentiment_jax.config_base import LAYOUTS, base_config, set_layout


def get_config(variant: str = "imdb"):
    c = base_config()
    variant, *layout = variant.split(",")  # e.g. "imdb,fsdp"; a bare "fsdp" means imdb
    if variant in LAYOUTS:
        variant, layout = "imdb", [variant]
    for name in layout:
        set_layout(c, name)
    c.model.name = "lstm"
    c.model.embed_dim = 128
    c.model.hidden_sizes = (128,)
    c.model.bidirectional = True
    c.model.pooling = "mean_max"
    c.model.dropout = 0.3
    c.data.bucket_width = 50
    if variant == "imdb":
        c.data.name = "imdb"
    elif variant == "nusax":
        c.data.name = "nusax_senti"
        c.data.language = "indonesian"
        c.data.max_length = 128
        c.data.tokenizer.vocab_size = 8000
        c.train.epochs = 20
        c.train.batch_size = 32
        c.checkpoint.best_metric = "macro_f1"
    else:
        raise ValueError(f"unknown variant '{variant}' of configs/lstm.py; choose imdb or nusax")
    return c
