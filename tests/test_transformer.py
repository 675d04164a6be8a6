"""The attention encoder against a NumPy forward pass; padding invariance; masked attention weights."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from sentiment_jax import config_base
from sentiment_jax.models import transformer
from helpers import padded as padded_with_junk


forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def make_model(pooling="mean", positions="sinusoidal", max_positions=16, **kw):
    return transformer.TransformerClassifier(vocab_size=30, num_outputs=3, embed_dim=8, num_layers=2, num_heads=2,
                                             mlp_dim=12, positions=positions, max_positions=max_positions,
                                             pooling=pooling, rngs=nnx.Rngs(0), **kw)


def padded(tokens, width, side):
    return padded_with_junk(tokens, width, side, junk=5)


TOKENS = [[3, 4, 5, 6, 7], [9], [2, 8, 11, 12, 13, 14, 15]]


# ---------------------------------------------------------------------------------------
# NumPy reference for one unpadded text.


def np_layer_norm(x, ln):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p(ln.scale) + p(ln.bias)


def np_gelu(x):  # the tanh approximation, jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def p(param):
    return np.asarray(param[...], np.float64)


def numpy_forward(model, ids):
    dim = model.embed.embedding.shape[-1]
    x = p(model.embed.embedding)[ids] * math.sqrt(dim)
    if model.cls is not None:
        x = np.concatenate([p(model.cls)[None] * math.sqrt(dim), x])
    pos = np.arange(len(x))
    if model.positions is not None:
        x = x + p(model.positions.embedding)[pos] * math.sqrt(dim)
    else:
        i = np.arange(dim // 2)
        angle = pos[:, None] / 10000.0 ** (i / (dim // 2))
        x = x + np.concatenate([np.sin(angle), np.cos(angle)], -1)
    for block in model.blocks:
        a = block.attention
        h = np_layer_norm(x, block.attention_norm)
        heads, head_dim = a.out_kernel.shape[:2]
        out = np.zeros_like(x)
        for n in range(heads):
            q, k, v = (h @ p(a.qkv_kernel)[:, s, n] + p(a.qkv_bias)[s, n] for s in range(3))
            scores = q @ k.T / np.sqrt(head_dim)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out += (w @ v) @ p(a.out_kernel)[n]
        x = x + out + p(a.out_bias)
        h = np_gelu(np_layer_norm(x, block.mlp_norm) @ p(block.mlp_in.kernel) + p(block.mlp_in.bias))
        x = x + h @ p(block.mlp_out.kernel) + p(block.mlp_out.bias)
    x = np_layer_norm(x, model.final_norm)
    pooled = x[0] if model.cls is not None else x.mean(0)
    return pooled @ p(model.out.kernel) + p(model.out.bias)


@pytest.mark.parametrize("pooling,positions", [("mean", "sinusoidal"), ("cls", "learned")])
def test_matches_numpy(pooling, positions):
    model = make_model(pooling, positions)
    for t in TOKENS:
        got = np.asarray(forward(model, *padded([t], len(t), "post")))[0]
        np.testing.assert_allclose(got, numpy_forward(model, np.asarray(t)), atol=1e-4)


# ---------------------------------------------------------------------------------------
# Invariants.


@pytest.mark.parametrize("pooling,positions", [("mean", "learned"), ("cls", "sinusoidal")])
def test_padding_never_changes_the_prediction(pooling, positions):
    model = make_model(pooling, positions)
    alone = np.concatenate([np.asarray(forward(model, *padded([t], len(t), "post"))) for t in TOKENS])
    for side in ("pre", "post"):
        for width in (7, 12):
            np.testing.assert_allclose(np.asarray(forward(model, *padded(TOKENS, width, side))), alone, atol=1e-5,
                                       err_msg=f"{side} {width}")


@pytest.mark.parametrize("side", ["pre", "post"])
def test_attention_weights_sum_to_one_over_real_tokens_and_are_zero_on_padding(side):
    model = make_model("cls")
    ids, mask = padded(TOKENS, 10, side)
    weights = model.attention_weights(ids, mask)
    assert len(weights) == 2
    keys = np.concatenate([np.ones((3, 1), bool), np.asarray(mask)], 1)  # the CLS token comes first
    for w in map(np.asarray, weights):
        assert w.shape == (3, 2, 11, 11)
        np.testing.assert_array_equal(np.where(keys[:, None, None, :], 0.0, w), 0.0)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


def test_dropout_is_active_only_in_training():
    model = make_model(dropout=0.5, embed_dropout=0.5)
    ids, mask = padded(TOKENS, 7, "pre")
    a, b = (model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(s))) for s in (0, 1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model(ids, mask), model(ids, mask))



@pytest.mark.parametrize("pooling", transformer.POOLINGS)
def test_learned_positions_check_matches_the_table_the_model_indexes(pooling):
    """The fewest model.max_positions that check_config accepts give finite logits on a full-length input;
    one fewer is refused, and would index past the table (NaN logits)."""
    cfg = config_base.base_config()
    cfg.model.update(name="transformer", pooling=pooling, positions="learned")
    cfg.data.max_length = 16
    ids, mask = jax.numpy.full((1, 16), 3), jax.numpy.ones((1, 16), bool)
    for rows, ok in ((16 + (pooling == "cls"), True), (15 + (pooling == "cls"), False)):
        cfg.model.max_positions = rows
        if ok:
            config_base.check_config(cfg)
        else:
            with pytest.raises(ValueError, match=f"model.max_positions {rows} is too few"):
                config_base.check_config(cfg)
        logits = forward(make_model(pooling, "learned", max_positions=rows), ids, mask)
        assert np.isfinite(np.asarray(logits)).all() == ok
