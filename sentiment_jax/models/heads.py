"""A classifier head on fixed feature vectors (a frozen backbone's cached features).

It follows the model interface `model(ids, mask, ...)` with `ids` = features [B, D]
(float) and `mask` [B, D], all False on the rows that only pad a final batch: those rows
are kept out of the BatchNorm statistics, so padding never changes what is learned.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class FeatureMLP(nnx.Module):
    """(Linear -> BatchNorm -> ReLU -> dropout) per hidden size, then a linear output."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], num_outputs: int, *, dropout: float,
                 rngs: nnx.Rngs):
        dense = lambda i, o, axes: nnx.Linear(i, o, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), axes), bias_init=nnx.with_partitioning(nnx.initializers.zeros,
                                                                                      axes[1:]))
        self.layers = nnx.List()
        self.norms = nnx.List()
        width = in_features
        for size in hidden_sizes:
            self.layers.append(dense(width, size, ("features", "mlp")))
            # momentum 0.9, not 0.99: a small feature set gives few steps per epoch, and slower
            # running statistics would still lag behind the weights when we evaluate.
            self.norms.append(nnx.BatchNorm(size, momentum=0.9, rngs=rngs))
            width = size
        self.out = dense(width, num_outputs, ("mlp", "classes"))
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        x = ids.astype(jnp.float32)
        real = mask.any(-1)
        for layer, norm in zip(self.layers, self.norms):
            x = norm(layer(x), use_running_average=deterministic, mask=real[:, None])
            x = self.dropout(jax.nn.relu(x), deterministic=deterministic, rngs=rngs)
        return self.out(x)
