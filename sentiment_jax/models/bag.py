"""fastText-style classifier: the mean of a text's feature embeddings, then an optional MLP and a linear layer.

With `data.tokenizer.kind = "ngrams"` the features are words plus hashed character and
word n-grams, so the model sees sub-word pieces without any recurrence: cheap, and hard
to overfit on a few hundred sentences. Word order enters only through the word n-grams.
Feature dropout (`embed_dropout`) removes whole features from the average during
training, a bag's form of word dropout.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sentiment_jax.models.pooling import masked_pool


class BagOfEmbeddings(nnx.Module):
    """Embedding -> masked mean over features -> (dropout, Linear, ReLU) per head size -> dropout -> logits."""

    def __init__(self, *, vocab_size: int, num_outputs: int, embed_dim: int = 64, head_sizes: Sequence[int] = (),
                 dropout: float = 0.0, embed_dropout: float = 0.0, rngs: nnx.Rngs):
        if not 0.0 <= embed_dropout < 1.0:
            raise ValueError(f"model.embed_dropout must be in [0, 1), got {embed_dropout}")
        dense = lambda i, o, axes: nnx.Linear(i, o, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), axes))
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(0.1), ("vocab", "embed")))
        self.head = nnx.List()
        width = embed_dim
        for size in head_sizes:
            self.head.append(dense(width, size, ("features", "mlp")))
            width = size
        self.out = dense(width, num_outputs, ("features", "classes"))
        self.feature_dropout = embed_dropout
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if not deterministic and self.feature_dropout:
            mask = mask & (jax.random.uniform(rngs.dropout(), mask.shape) >= self.feature_dropout)
        x = masked_pool(self.embed(ids), mask, "mean")
        for dense in self.head:
            x = jax.nn.relu(dense(self.dropout(x, deterministic=deterministic, rngs=rngs)))
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        return self.out(x).astype(jnp.float32)
