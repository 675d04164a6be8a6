"""Helpers shared by the tests: tiny learnable datasets and configs, padded id batches."""

import pathlib

import jax.numpy as jnp
import numpy as np

from flax import nnx

from sentiment_jax import config_base, runs

POSITIVE = "great superb lovely fine wonderful moving".split()
NEGATIVE = "awful boring dull poor terrible weak".split()
NEUTRAL = "the a film movie plot actor scene it was".split()


def write_dataset(folder: pathlib.Path, n_train=160, n_test=64, seed=0) -> dict:
    """A small learnable sentiment CSV: sentiment words among neutral filler, varied lengths."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = ["text,label"]
        for i in range(n):
            label = i % 2
            words = list(rng.choice(NEUTRAL, size=rng.integers(2, 12)))
            words.insert(rng.integers(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
            rows.append(f"{' '.join(words)},{'pos' if label else 'neg'}")
        files[split] = folder / f"{split}.csv"
        files[split].write_text("\n".join(rows) + "\n")
    return files


def tiny_data(files) -> dict:
    """Field overrides that point any config at the tiny CSVs with tiny lengths and batches."""
    return {
        "data.name": "csv", "data.train_file": str(files["train"]), "data.test_file": str(files["test"]),
        "data.validation_fraction": 0.2, "data.max_length": 16, "data.tokenizer.vocab_size": 64,
        "data.bucket_width": 0, "train.batch_size": 16, "train.eval_batch_size": 32, "train.learning_rate": 3e-2,
        "train.log_every": 1, "checkpoint.async_save": False,
    }


def tiny_config(files, **overrides):
    cfg = config_base.base_config()
    cfg.model.embed_dim, cfg.model.hidden_sizes = 8, (8,)
    cfg.model.pooling, cfg.model.dropout = "mean", 0.1
    cfg.train.epochs = 4
    for key, value in {**tiny_data(files), **overrides}.items():
        node = cfg
        *path, leaf = key.split(".")
        for k in path:
            node = node[k]
        node[leaf] = value
    return cfg


def fake_run(cfg, encoder, model, label_names=("neg", "pos")) -> runs.Run:
    """An untrained model and its encoder, standing in for a run restored by runs.load."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return runs.Run(None, cfg, tuple(label_names), encoder, 0, graphdef, params, rest, None, None, None)


def random_batches(n, vocab, batch=16, length=12, seed=0):
    """`n` train batches of random pre-padded ids and labels."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        lengths = rng.integers(1, length + 1, batch)
        mask = np.arange(length)[None, :] >= length - lengths[:, None]  # pre-padded
        yield {"ids": np.where(mask, rng.integers(2, vocab, (batch, length)), 0).astype(np.int32),
               "mask": mask, "label": rng.integers(0, 2, batch).astype(np.int32),
               "weight": np.ones(batch, np.float32)}


def padded(tokens, width, side, junk):
    """ids [B, width] holding `junk` ids at padding positions, so only the mask can hide them."""
    ids, mask = np.full((len(tokens), width), junk, np.int32), np.zeros((len(tokens), width), bool)
    for i, t in enumerate(tokens):
        where = slice(width - len(t), width) if side == "pre" else slice(0, len(t))
        ids[i, where], mask[i, where] = t, True
    return jnp.asarray(ids), jnp.asarray(mask)
