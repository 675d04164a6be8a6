"""Model registry: `config.model.name` -> a builder taking (model config, vocab size, outputs, rngs).

Every model is an `nnx.Module` called as `model(ids, mask, deterministic=..., rngs=...)`
and returning float32 logits [B, num_outputs]. Models that attend (the transformer, or a
recurrent model with pooling 'attention') also offer `attention_weights(ids, mask)` for display.
Models on frozen-backbone features (`config.data.inputs = "backbone_features"`, see
verbalizer.py) get the feature width as `vocab_size` and the features as `ids`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from sentiment_jax import cpu_kernels
from sentiment_jax.models import bag, heads, recurrent, transformer

# Parameters carry logical axis names; the mesh mapping is applied later (see sharding.py).
nnx.use_eager_sharding(False)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def lstm_backend(requested: str) -> str:
    """What an LSTM layer runs for model.lstm_backend on this platform. The same config runs
    everywhere: the scan computes the same function, so it stands in where the choice cannot run,
    and 'auto' takes the CPU kernel wherever it builds."""
    platform = jax.default_backend()
    if requested == "auto":
        return "cpu_kernel" if platform == "cpu" and cpu_kernels.builds() else "scan"
    if requested == "cudnn" and not recurrent.cudnn_available():
        logging.warning("model.lstm_backend 'cudnn' needs a CUDA GPU; using the scan on %s", platform)
        return "scan"
    if requested == "cpu_kernel":
        if platform != "cpu":
            logging.warning("model.lstm_backend 'cpu_kernel' runs on CPUs; using the scan on %s", platform)
            return "scan"
        cpu_kernels.register()  # asked for by name: a build failure is an error, not a fallback
    return requested


def _recurrent(cell: str) -> Callable:
    def build(cfg, vocab_size: int, num_outputs: int, rngs: nnx.Rngs) -> nnx.Module:
        backend = lstm_backend(cfg.lstm_backend) if cell == "lstm" else "scan"
        return recurrent.RecurrentClassifier(
            vocab_size=vocab_size, num_outputs=num_outputs, cell=cell,
            embed_dim=cfg.embed_dim, hidden_sizes=tuple(cfg.hidden_sizes),
            bidirectional=cfg.bidirectional if isinstance(cfg.bidirectional, bool) else tuple(cfg.bidirectional),
            pooling=cfg.pooling, dropout=cfg.dropout, embed_dropout=cfg.embed_dropout,
            word_dropout=cfg.word_dropout, head_sizes=tuple(cfg.head_sizes),
            attention_dim=cfg.attention_dim, unroll=cfg.unroll, backend=backend,
            dtype=DTYPES[cfg.dtype], rngs=rngs)
    return build


def _transformer(cfg, vocab_size: int, num_outputs: int, rngs: nnx.Rngs) -> nnx.Module:
    return transformer.TransformerClassifier(
        vocab_size=vocab_size, num_outputs=num_outputs, embed_dim=cfg.embed_dim, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, positions=cfg.positions, max_positions=cfg.max_positions,
        pooling=cfg.pooling, dropout=cfg.dropout, embed_dropout=cfg.embed_dropout, dtype=DTYPES[cfg.dtype],
        rngs=rngs)


def _bag(cfg, vocab_size: int, num_outputs: int, rngs: nnx.Rngs) -> nnx.Module:
    return bag.BagOfEmbeddings(vocab_size=vocab_size, num_outputs=num_outputs, embed_dim=cfg.embed_dim,
                               head_sizes=tuple(cfg.head_sizes), dropout=cfg.dropout,
                               embed_dropout=cfg.embed_dropout, weights=cfg.bag_weights,
                               norm=cfg.bag_norm, sublinear_tf=cfg.sublinear_tf,
                               rngs=rngs)


def _nb_linear(cfg, vocab_size: int, num_outputs: int, rngs: nnx.Rngs) -> nnx.Module:
    return bag.NBLinear(vocab_size=vocab_size, num_outputs=num_outputs, feature_dropout=cfg.embed_dropout, rngs=rngs)


def _feature_mlp(cfg, vocab_size: int, num_outputs: int, rngs: nnx.Rngs) -> nnx.Module:
    return heads.FeatureMLP(vocab_size, tuple(cfg.head_sizes), num_outputs, dropout=cfg.dropout, rngs=rngs)


MODELS: dict[str, Callable] = {
    "fasttext": _bag,
    "feature_mlp": _feature_mlp,
    "nb_linear": _nb_linear,
    "lstm": _recurrent("lstm"),
    "gru": _recurrent("gru"),
    "rnn": _recurrent("rnn"),
    "transformer": _transformer,
}


def build_model(cfg, vocab_size: int, num_outputs: int, rngs: nnx.Rngs) -> nnx.Module:
    """The model of a config that `config_base.check_config` accepted."""
    return MODELS[cfg.name](cfg, vocab_size, num_outputs, rngs)
