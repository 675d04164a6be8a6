"""Masked pooling over time: [B, T, D] outputs and a [B, T] mask -> one vector per text.

Padding positions never contribute, so a prediction cannot depend on how much padding a
batch has or on which side it is. An empty sequence pools to zeros rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis counting only `mask` positions: exactly 0 elsewhere, never NaN."""
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    exp = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    return exp / jnp.maximum(jnp.sum(exp, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def masked_pool(outputs: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """Mean or max over real time steps of [B, T, D]."""
    m = mask[..., None]
    if how == "mean":
        return jnp.sum(jnp.where(m, outputs, 0), axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
    if how == "max":
        pooled = jnp.max(jnp.where(m, outputs, -jnp.inf), axis=1)
        return jnp.where(jnp.isfinite(pooled), pooled, 0)
    raise ValueError(f"unknown pooling '{how}'")


class AttentionPool(nnx.Module):
    """Learned additive attention: score_t = v . tanh(W h_t + b); a weighted sum of real steps.

    Unlike mean/max pooling, the weights say which tokens the classifier read, so they can
    be shown to a user (`weights`).
    """

    def __init__(self, features: int, attention_dim: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(features, attention_dim, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("features", "mlp")))
        self.score = nnx.Linear(attention_dim, 1, use_bias=False, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("mlp", None)))

    def weights(self, outputs: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T] float32 weights: sum to 1 over real steps, 0 on padding."""
        return masked_softmax(self.score(jnp.tanh(self.proj(outputs)))[..., 0], mask)

    def __call__(self, outputs: jax.Array, mask: jax.Array) -> jax.Array:
        w = self.weights(outputs, mask)
        return jnp.einsum("bt,btd->bd", w.astype(outputs.dtype), outputs)
