"""fastText-style classifier: the mean of a text's feature embeddings, then an optional MLP and a linear layer.

With `data.tokenizer.kind = "ngrams"` the features are words plus hashed character and
word n-grams, so the model sees sub-word pieces without any recurrence: cheap, and hard
to overfit on a few hundred sentences. Word order enters only through the word n-grams.
Feature dropout (`embed_dropout`) removes whole features from the average during
training, a bag's form of word dropout.

The average can be weighted as TF-IDF weights a linear model's inputs: `weights="idf"`
scales each feature by its inverse document frequency in the training split (fixed
`FeatureWeights`, saved in the checkpoint beside the parameters), `sublinear_tf` counts a
feature seen k times in one text as 1 + ln k, and `norm="l2"` divides the weighted sum by
the Euclidean norm of the text's feature vector instead of its sum (`"l1"`, the mean).

`NBLinear` is the classical baseline on the same features: a linear model whose binary inputs
are scaled per class by Naive Bayes log-count ratios of the training split (NBSVM, Wang and
Manning 2012), trained here with softmax cross-entropy. The scaling acts as a per-feature prior:
an n-gram whose training counts separate the classes gets a large input and so a large share of
the logits, for the same weight norm. It is the best model here on IMDB and on NusaX
(docs/results.md).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sentiment_jax import tokenization
from sentiment_jax.models.from_data import TrainingData, start_embeddings
from sentiment_jax.models.pooling import masked_pool


class FeatureWeights(nnx.Variable):
    """A fixed weight per feature id (e.g. IDF of the training split): in the model state, never trained."""


def term_frequencies(ids: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] int32: how often each real position's id occurs among the real positions of its row; 0 on padding."""
    keys = jnp.where(mask, ids, -1)  # ids are >= 0, so padding never matches a real id
    ordered = jnp.sort(keys, axis=-1)
    count = jax.vmap(lambda row, k: jnp.searchsorted(row, k, "right") - jnp.searchsorted(row, k, "left"))
    return jnp.where(mask, count(ordered, keys), 0).astype(jnp.int32)


def drop_features(mask: jax.Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """In training, `mask` with a `rate` fraction of its positions (whole features) switched off."""
    if deterministic or not rate:
        return mask
    return mask & (jax.random.uniform(rngs.dropout(), mask.shape) >= rate)


class BagOfEmbeddings(nnx.Module):
    """Embedding -> weighted, normalised sum over features -> (dropout, Linear, ReLU) per head size -> dropout -> logits.

    Feature vector v of a text: v_f = tf(f) (or 1 + ln tf(f) with `sublinear_tf`) times w_f, with
    w_f = 1 (`weights="uniform"`) or the id's entry of `feature_weights` (`"idf"`). The pooled
    vector is sum_f v_f E_f / |v|, the 1-norm (`norm="l1"`; uniform weights: the plain mean) or the 2-norm.
    """

    def __init__(self, *, vocab_size: int, num_outputs: int, embed_dim: int = 64, head_sizes: Sequence[int] = (),
                 dropout: float = 0.0, embed_dropout: float = 0.0, weights: str = "uniform", norm: str = "l1",
                 sublinear_tf: bool = False, feature_weights: np.ndarray | None = None, rngs: nnx.Rngs):
        if feature_weights is not None and np.shape(feature_weights) != (vocab_size,):
            raise ValueError(f"feature_weights must have shape ({vocab_size},), got {np.shape(feature_weights)}")
        self.weights, self.norm, self.sublinear_tf = weights, norm, bool(sublinear_tf)
        if weights == "idf":  # None: ones, until `from_data` or a checkpoint fills them
            self.feature_weights = FeatureWeights(
                jnp.ones(vocab_size, jnp.float32) if feature_weights is None
                else jnp.asarray(feature_weights, jnp.float32), out_sharding=("vocab",))
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


    def from_data(self, data: TrainingData) -> None:
        """IDF of the training texts as encoded (`weights="idf"`), and pretrained vectors when the run has them."""
        if self.weights == "idf":
            self.feature_weights[...] = jnp.asarray(
                tokenization.inverse_document_frequency(data.sequences(), data.vocab_size))
        start_embeddings(self.embed, data.embeddings)

    def __call__(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        mask = drop_features(mask, self.feature_dropout, deterministic, rngs)
        x = self.pool(self.embed(ids), ids, mask)
        for dense in self.head:
            x = jax.nn.relu(dense(self.dropout(x, deterministic=deterministic, rngs=rngs)))
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        return self.out(x).astype(jnp.float32)

    def pool(self, embedded: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T, D] embeddings of the real positions of `mask` -> [B, D]; an empty bag pools to zeros."""
        if self.weights == "uniform" and self.norm == "l1" and not self.sublinear_tf:
            return masked_pool(embedded, mask, "mean")
        w = jnp.where(mask, self.feature_weights[...][ids] if self.weights == "idf" else 1.0, 0.0)
        if self.sublinear_tf or self.norm == "l2":
            tf = jnp.maximum(term_frequencies(ids, mask), 1).astype(jnp.float32)
        if self.sublinear_tf:  # each of tf occurrences carries (1 + ln tf) / tf of the feature's weight
            w = w * (1.0 + jnp.log(tf)) / tf
        # |v|_1 = sum over positions of w; |v|_2^2 = sum_f (tf_f w_f)^2 = sum over positions of w^2 tf.
        z = jnp.sum(w, -1) if self.norm == "l1" else jnp.sqrt(jnp.sum(w * w * tf, -1))
        pooled = jnp.einsum("bt,btd->bd", w.astype(embedded.dtype), embedded)
        return pooled / jnp.maximum(z, jnp.finfo(jnp.float32).tiny)[:, None].astype(embedded.dtype)


class NBLinear(nnx.Module):
    """logit_c = b_c + sum over the distinct features f of a text of r_fc w_fc: binary inputs, NB-scaled.

    r ([vocab, classes] `FeatureWeights`, log-count ratios from `tokenization.log_count_ratios`) is
    fixed and saved in the checkpoint. The trained weights w start at 0 (every class equally likely), and
    weight decay pulls w, not r, towards 0. `feature_dropout` drops whole features in training.
    """

    def __init__(self, *, vocab_size: int, num_outputs: int, feature_dropout: float = 0.0, rngs: nnx.Rngs):
        shape = (vocab_size, num_outputs)
        self.feature_weights = FeatureWeights(jnp.ones(shape, jnp.float32), out_sharding=("vocab", "classes"))
        self.kernel = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab", "classes"))(
            rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros(num_outputs, jnp.float32))
        self.feature_dropout = feature_dropout


    def from_data(self, data: TrainingData) -> None:
        """The NB log-count ratios of the training texts as encoded; one sigmoid output scores the last class."""
        ratios = tokenization.log_count_ratios(data.sequences(), data.labels, data.vocab_size, data.num_classes)
        self.feature_weights[...] = jnp.asarray(ratios[:, -data.num_outputs:])

    def __call__(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        mask = drop_features(mask, self.feature_dropout, deterministic, rngs)
        # Each occurrence of a feature seen tf times carries 1/tf: every distinct feature counts once.
        presence = jnp.where(mask, 1.0 / jnp.maximum(term_frequencies(ids, mask), 1), 0.0)
        return jnp.einsum("bt,btc->bc", presence, self.embed(ids)) + self.bias[...]

    def embed(self, ids: jax.Array) -> jax.Array:
        """[B, T, classes] r_fc w_fc of each position's feature: what an embedding is to the bag model,
        and what interpret.saliency perturbs (for this linear model its gradient x input is exact)."""
        return self.feature_weights[...][ids] * self.kernel[...][ids]
