"""Attention pooling over recurrent outputs: NumPy reference, masked weights, padding invariance."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sentiment_jax.models import pooling, recurrent
from helpers import padded as padded_with_junk


# One compiled program per shape (eager calls would retrace the scan on every call).
forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
weights_of = nnx.jit(lambda model, ids, mask: model.attention_weights(ids, mask))


def make_model(cell="lstm", **kw):
    return recurrent.RecurrentClassifier(vocab_size=40, num_outputs=1, cell=cell, embed_dim=6, hidden_sizes=(5,),
                                         pooling="attention", attention_dim=4, rngs=nnx.Rngs(0), **kw)


def padded(tokens, width, side):
    return padded_with_junk(tokens, width, side, junk=7)


def test_attention_pool_matches_numpy():
    rng = np.random.default_rng(0)
    pool = pooling.AttentionPool(6, 4, rngs=nnx.Rngs(1))
    pool.proj.bias[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    h = rng.normal(size=(2, 5, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], bool)
    w1, b1 = np.asarray(pool.proj.kernel[...]), np.asarray(pool.proj.bias[...])
    v = np.asarray(pool.score.kernel[...])[:, 0]
    for i in range(2):
        real = h[i][mask[i]]
        scores = np.tanh(real @ w1 + b1) @ v
        weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        got_w = np.asarray(pool.weights(jnp.asarray(h), jnp.asarray(mask)))[i]
        np.testing.assert_allclose(got_w[mask[i]], weights, atol=1e-6)
        np.testing.assert_array_equal(got_w[~mask[i]], 0.0)
        np.testing.assert_allclose(np.asarray(pool(jnp.asarray(h), jnp.asarray(mask)))[i], weights @ real,
                                   atol=1e-6)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_weights_sum_to_one_over_real_tokens_and_are_zero_on_padding(side):
    model = make_model()
    ids, mask = padded([[3, 4, 5, 6], [9], [2, 8, 11, 12, 13, 14]], 9, side)
    w = np.asarray(weights_of(model, ids, mask))
    assert w.shape == (3, 9)
    np.testing.assert_array_equal(w[~np.asarray(mask)], 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


def test_padding_never_changes_the_prediction():
    model = make_model("gru", bidirectional=True)
    tokens = [[3, 4, 5, 6], [9], [2, 8, 11, 12, 13, 14]]
    alone = np.concatenate([np.asarray(forward(model, *padded([t], len(t), "post"))) for t in tokens])
    for side in ("pre", "post"):
        for width in (6, 11):
            np.testing.assert_allclose(np.asarray(forward(model, *padded(tokens, width, side))), alone, atol=1e-5,
                                       err_msg=f"{side} {width}")


def test_empty_text_gives_zero_weights_not_nan():
    w = pooling.masked_softmax(jnp.zeros((2, 4)), jnp.zeros((2, 4), bool))
    np.testing.assert_array_equal(np.asarray(w), 0.0)


def test_attention_weights_need_attention_pooling():
    model = recurrent.RecurrentClassifier(vocab_size=10, num_outputs=2, embed_dim=4, hidden_sizes=(3,),
                                          pooling="mean", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pooling 'attention'"):
        model.attention_weights(jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), bool))
