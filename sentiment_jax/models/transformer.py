"""Attention encoder: token embedding + positions, pre-LayerNorm blocks, masked pooling.

Padding can never change a prediction: padded keys get attention weight exactly 0, and
positions count real tokens only (a cumulative sum of the mask), so a pre-padded text
gets the same positions as a post-padded or unpadded one. Each block returns the
attention weights it computed anyway; `__call__` drops them and `attention_weights`
returns them for display.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sentiment_jax.models.from_data import TrainingData, start_embeddings
from sentiment_jax.models.pooling import masked_pool, masked_softmax

POSITIONS = ("sinusoidal", "learned")
POOLINGS = ("mean", "cls")


def _param(rngs: nnx.Rngs, init, shape, axes) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, jnp.float32))


def _linear(n_in: int, n_out: int, axes: tuple[str, str], dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, dtype=dtype, rngs=rngs, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), axes), bias_init=nnx.with_partitioning(
        nnx.initializers.zeros_init(), axes[1:]))


def _layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, dtype=dtype, rngs=rngs,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))


def sinusoidal(positions: jax.Array, dim: int) -> jax.Array:
    """Fixed encodings [B, T, dim] of integer positions [B, T]: sines then cosines of geometric frequencies."""
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(dim // 2) / (dim // 2))
    angles = positions[..., None].astype(jnp.float32) * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class SelfAttention(nnx.Module):
    """Multi-head self-attention over [B, T, D]; keys outside the mask get weight 0."""

    def __init__(self, dim: int, num_heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        head_dim = dim // num_heads
        self.dtype = dtype
        self.qkv_kernel = _param(rngs, nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3)),
                                 (dim, 3, num_heads, head_dim), ("embed", None, "heads", "kv"))
        self.qkv_bias = _param(rngs, nnx.initializers.zeros_init(), (3, num_heads, head_dim), (None, "heads", "kv"))
        self.out_kernel = _param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
                                 (num_heads, head_dim, dim), ("heads", "kv", "embed"))
        self.out_bias = _param(rngs, nnx.initializers.zeros_init(), (dim,), ("embed",))

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (outputs [B, T, D], float32 weights [B, heads, query T, key T])."""
        qkv = jnp.einsum("btd,dshk->sbthk", x, self.qkv_kernel[...].astype(self.dtype))
        q, k, v = qkv + self.qkv_bias[...].astype(self.dtype)[:, None, None]
        scores = jnp.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
        weights = masked_softmax(scores, mask[:, None, None, :])
        out = jnp.einsum("bhqt,bthk->bqhk", weights.astype(self.dtype), v)
        out = jnp.einsum("bqhk,hkd->bqd", out, self.out_kernel[...].astype(self.dtype))
        return out + self.out_bias[...].astype(self.dtype), weights


class EncoderBlock(nnx.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)); dropout on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.attention_norm = _layer_norm(dim, dtype, rngs)
        self.attention = SelfAttention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.mlp_norm = _layer_norm(dim, dtype, rngs)
        self.mlp_in = _linear(dim, mlp_dim, ("embed", "mlp"), dtype, rngs)
        self.mlp_out = _linear(mlp_dim, dim, ("mlp", "embed"), dtype, rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool,
                 rngs: nnx.Rngs | None) -> tuple[jax.Array, jax.Array]:
        drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
        attended, weights = self.attention(self.attention_norm(x), mask)
        x = x + drop(attended)
        hidden = drop(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))
        return x + drop(self.mlp_out(hidden)), weights


class TransformerClassifier(nnx.Module):
    """Embedding + positions -> encoder blocks -> final LayerNorm -> masked mean or CLS -> logits."""

    def __init__(self, *, vocab_size: int, num_outputs: int, embed_dim: int = 128, num_layers: int = 2,
                 num_heads: int = 4, mlp_dim: int = 256, positions: str = "sinusoidal", max_positions: int = 512,
                 pooling: str = "mean", dropout: float = 0.1, embed_dropout: float = 0.1, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype, self.pooling, self.scale = dtype, pooling, math.sqrt(embed_dim)
        embed_init = nnx.initializers.normal(1.0 / math.sqrt(embed_dim))
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs,
                               embedding_init=nnx.with_partitioning(embed_init, ("vocab", "embed")))
        self.positions = (nnx.Embed(max_positions, embed_dim, rngs=rngs, embedding_init=nnx.with_partitioning(
            embed_init, ("pos", "embed"))) if positions == "learned" else None)
        self.cls = _param(rngs, embed_init, (embed_dim,), ("embed",)) if pooling == "cls" else None
        self.blocks = nnx.List([EncoderBlock(embed_dim, num_heads, mlp_dim, dropout, dtype=dtype, rngs=rngs)
                                for _ in range(num_layers)])
        self.final_norm = _layer_norm(embed_dim, dtype, rngs)
        self.embed_dropout = nnx.Dropout(embed_dropout)
        self.dropout = nnx.Dropout(dropout)
        self.out = nnx.Linear(embed_dim, num_outputs, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("embed", "classes")))


    def from_data(self, data: TrainingData) -> None:
        """Starts the token table from pretrained vectors when the run has them."""
        start_embeddings(self.embed, data.embeddings)

    def encode(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
        """(normed outputs [B, T', D], mask [B, T'], per-layer weights); T' = T + 1 with a CLS token first."""
        x = self.embed(ids) * self.scale
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...] * self.scale, (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
            mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
        position = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 0)
        x = x + (self.positions(position) * self.scale if self.positions is not None
                 else sinusoidal(position, x.shape[-1]))
        x = self.embed_dropout(x.astype(self.dtype), deterministic=deterministic, rngs=rngs)
        weights = []
        for block in self.blocks:
            x, w = block(x, mask, deterministic=deterministic, rngs=rngs)
            weights.append(w)
        return self.final_norm(x), mask, weights

    def attention_weights(self, ids: jax.Array, mask: jax.Array) -> list[jax.Array]:
        """Per layer [B, heads, T', T'] float32: each query's weights sum to 1 over real keys, 0 on padding."""
        return self.encode(ids, mask)[2]

    def __call__(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        x, mask, _ = self.encode(ids, mask, deterministic=deterministic, rngs=rngs)
        pooled = x[:, 0] if self.pooling == "cls" else masked_pool(x, mask, "mean")
        pooled = self.dropout(pooled, deterministic=deterministic, rngs=rngs)
        return self.out(pooled).astype(jnp.float32)
