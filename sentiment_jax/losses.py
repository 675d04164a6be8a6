"""Losses and their read-outs: softmax cross-entropy over K logits, or sigmoid BCE over one logit (binary)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def num_outputs(cfg, num_classes: int) -> int:
    """Logits a model of this config has: K for softmax, 1 for the binary sigmoid."""
    if cfg.train.loss == "softmax":
        return num_classes
    if cfg.train.loss == "sigmoid":
        if num_classes != 2:
            raise ValueError(f"train.loss 'sigmoid' needs 2 classes, the data has {num_classes}; use 'softmax'")
        return 1
    raise ValueError(f"unknown train.loss '{cfg.train.loss}'; choose 'softmax' or 'sigmoid'")


def probabilities(logits: jax.Array) -> jax.Array:
    """Class probabilities [B, K] from either loss's logits."""
    if logits.shape[-1] == 1:
        p = jax.nn.sigmoid(logits[:, 0])
        return jnp.stack([1 - p, p], axis=-1)
    return jax.nn.softmax(logits, axis=-1)


def per_example_loss(logits: jax.Array, labels: jax.Array, confidence_penalty: float = 0.0) -> jax.Array:
    """Softmax CE or sigmoid BCE; with a penalty λ, BCE - λ·|p - 0.5| (whose mean is bce - λ·mean|p - 0.5|)."""
    if logits.shape[-1] == 1:
        bce = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
        return bce - confidence_penalty * jnp.abs(jax.nn.sigmoid(logits[:, 0]) - 0.5)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def predictions(logits: jax.Array) -> jax.Array:
    return (logits[:, 0] > 0).astype(jnp.int32) if logits.shape[-1] == 1 else jnp.argmax(logits, -1)


def class_weights(cfg, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Per-class loss weights (train.class_weights): 'balanced' gives class c the weight n / (K n_c)
    over the training labels, so every class contributes equally to the loss; 'none' gives None."""
    if cfg.train.class_weights == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"train.class_weights 'balanced': class(es) {np.flatnonzero(counts == 0).tolist()} "
                         "have no training examples")
    return (len(labels) / (num_classes * counts)).astype(np.float32)
