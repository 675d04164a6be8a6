"""Skip-gram word vectors (word2vec with negative sampling) to start a model's token embeddings.

Why: a classifier trained from scratch learns its embedding table from the labelled texts alone,
and most of IMDB's 20k words occur too rarely there to get a useful vector. Skip-gram reads the
training texts plus unlabelled ones (IMDB ships 50k unlabelled reviews) and places words by the
company they keep, so the classifier starts from vectors in which "superb" is already near "great".
No label, validation or test text is read.

The method is that of Mikolov et al. (2013): every (center, context) pair within a randomly
shrunk window is a positive, `negatives` words drawn from the unigram distribution to the power
0.75 are negatives, and frequent words are randomly dropped (keep probability sqrt(t / f) + t / f).
Pairs are made with NumPy once per epoch; the loss and the Adam update are one jitted step.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sentiment_jax import distributed, files, tokenization

EMBEDDINGS_FILE = "word2vec_{key}.npy"


def keep_probabilities(counts: np.ndarray, threshold: float) -> np.ndarray:
    """Per-id probability of keeping a token in an epoch: frequent words are thinned (threshold 0: keep all)."""
    if threshold <= 0:
        return np.ones(len(counts))
    freq = counts / max(counts.sum(), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.sqrt(threshold / freq) + threshold / freq
    return np.where(counts > 0, np.minimum(keep, 1.0), 0.0)


def skipgram_pairs(sequences: Sequence[np.ndarray], window: int, keep: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """[P, 2] (center, context) id pairs of one epoch, never across two texts.

    Each kept token draws its own window size in [1, window] (nearer words count more, as in
    word2vec); padding and unknown-word ids are dropped before pairing.
    """
    tokens = np.concatenate(sequences) if len(sequences) else np.zeros(0, np.int32)
    doc = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    kept = (tokens > tokenization.UNK_ID) & (rng.random(len(tokens)) < keep[tokens])
    tokens, doc = tokens[kept], doc[kept]
    reach = rng.integers(1, window + 1, len(tokens))
    pairs = []
    for d in range(1, window + 1):
        same = doc[:-d] == doc[d:]
        forward = same & (reach[:-d] >= d)  # center i, context i + d
        backward = same & (reach[d:] >= d)  # center i + d, context i
        pairs.append(np.stack([tokens[:-d][forward], tokens[d:][forward]], 1))
        pairs.append(np.stack([tokens[d:][backward], tokens[:-d][backward]], 1))
    return np.concatenate(pairs).astype(np.int32)


def negative_sampling_loss(center: jax.Array, context: jax.Array, negatives: jax.Array) -> jax.Array:
    """Mean over pairs of -log σ(c·o) - Σ_k log σ(-c·n_k); center, context [B, D], negatives [B, K, D]."""
    positive = jnp.sum(center * context, -1)
    negative = jnp.einsum("bd,bkd->bk", center, negatives)
    return -jnp.mean(jax.nn.log_sigmoid(positive) + jnp.sum(jax.nn.log_sigmoid(-negative), -1))


def train(sequences: Sequence[np.ndarray], vocab_size: int, dim: int, *, epochs: int = 3, window: int = 5,
          negatives: int = 5, batch_size: int = 4096, learning_rate: float = 3e-3, subsample: float = 1e-4,
          seed: int = 0, log_every: int = 2000) -> np.ndarray:
    """The center-word vectors [vocab_size, dim] after `epochs` passes of skip-gram over `sequences`."""
    counts = np.bincount(np.concatenate(sequences), minlength=vocab_size).astype(np.float64)
    counts[: tokenization.UNK_ID + 1] = 0
    if counts.sum() == 0:
        raise ValueError("word2vec: the texts contain no known words; check the tokenizer and the texts")
    keep = keep_probabilities(counts, subsample)
    noise = counts ** 0.75
    noise_cdf = jnp.asarray(np.cumsum(noise / noise.sum()), jnp.float32)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    # word2vec's start: small random center vectors, zero context vectors.
    tables = {"center": jax.random.uniform(key, (vocab_size, dim), jnp.float32, -0.5 / dim, 0.5 / dim),
              "context": jnp.zeros((vocab_size, dim), jnp.float32)}
    # Steps per epoch vary with the random thinning and windows; the schedule uses the expected count.
    expected_pairs = (keep * counts).sum() * (window + 1)
    total_steps = max(int(epochs * expected_pairs / batch_size), 1)
    tx = optax.adam(optax.linear_schedule(learning_rate, learning_rate * 0.01, total_steps))
    opt_state = tx.init(tables)

    @jax.jit
    def step(tables, opt_state, pairs, key):
        draws = jax.random.uniform(key, (pairs.shape[0], negatives))
        noise_ids = jnp.minimum(jnp.searchsorted(noise_cdf, draws), vocab_size - 1)

        def loss_fn(t):
            return negative_sampling_loss(t["center"][pairs[:, 0]], t["context"][pairs[:, 1]],
                                          t["context"][noise_ids])

        loss, grads = jax.value_and_grad(loss_fn)(tables)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(tables, updates), opt_state, loss

    n = 0
    for epoch in range(epochs):
        pairs = skipgram_pairs(sequences, window, keep, rng)
        if not len(pairs):
            raise ValueError("word2vec: no (center, context) pairs; the texts are too short or too few, "
                             "or pretrain.subsample thins out too many words (0 keeps every word)")
        pairs = pairs[rng.permutation(len(pairs))]
        batch = min(batch_size, len(pairs))
        losses = []
        for start in range(0, len(pairs) - batch + 1, batch):  # the ragged tail is dropped
            key, sub = jax.random.split(key)
            tables, opt_state, loss = step(tables, opt_state, pairs[start:start + batch], sub)
            losses.append(loss)
            n += 1
            if n % log_every == 0:
                logging.info("word2vec step %d: loss %.4f", n, float(loss))
        print(f"word2vec epoch {epoch + 1}/{epochs}: {len(pairs):,} pairs, "
              f"loss {float(jnp.mean(jnp.stack(losses))):.4f}", flush=True)
    return np.array(tables["center"])  # a writable copy


def pretrained_embeddings(cfg, train_texts: Sequence[str], unlabeled_texts: Sequence[str], tokenizer,
                          workdir: pathlib.Path) -> np.ndarray | None:
    """The run's starting embedding table when `pretrain.embeddings` is 'word2vec', else None.

    Trained once per (config, tokenizer, texts) by process 0 and cached in the workdir, so a
    resumed run or another process reads the same table. Padding's row is zero.
    """
    p = cfg.pretrain
    if p.embeddings == "none":
        return None
    texts = list(train_texts) + list(unlabeled_texts)
    key = hashlib.sha256(json.dumps([p.to_dict(), cfg.model.embed_dim, cfg.seed], sort_keys=True).encode())
    key.update(tokenizer.fingerprint.encode())
    key.update("\0".join(texts).encode())  # every text: a tenth of a second for IMDB
    file = workdir / EMBEDDINGS_FILE.format(key=key.hexdigest()[:16])
    if jax.process_index() == 0 and not file.is_file():
        print(f"word2vec: {len(train_texts):,} training + {len(texts) - len(train_texts):,} unlabeled texts",
              flush=True)
        t0 = time.time()
        # Whole texts, not the training arrays, which are cut to data.max_length.
        table = train(tokenizer.encode(texts), tokenizer.vocab_size, cfg.model.embed_dim, epochs=p.epochs,
                      window=p.window, negatives=p.negatives, batch_size=p.batch_size,
                      learning_rate=p.learning_rate, subsample=p.subsample, seed=cfg.seed)
        print(f"word2vec: {time.time() - t0:.0f} s", flush=True)
        table[tokenization.PAD_ID] = 0.0
        with files.atomic_path(file) as tmp, open(tmp, "wb") as f:
            np.save(f, table.astype(np.float32))
    distributed.sync("word2vec")
    return np.load(file)
