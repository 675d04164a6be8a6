"""The LSTM against an independent NumPy implementation, and padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sentiment_jax.models import recurrent


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_lstm(x, w_x, w_h, b):
    """Textbook LSTM over one unpadded sequence x [T, F]; gate order i, f, g, o. Returns [T, H]."""
    hidden = w_h.shape[0]
    h, c, out = np.zeros(hidden), np.zeros(hidden), []
    for x_t in x:
        z = x_t @ w_x + h @ w_h + b
        i, f, g, o = (z[k * hidden:(k + 1) * hidden] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


def cell_weights(cell):
    return (np.asarray(cell.input_kernel[...], np.float64), np.asarray(cell.recurrent_kernel[...], np.float64),
            np.asarray(cell.bias[...], np.float64))


def pad_batch(seqs, width, side, noise=None):
    """[B, width, F] inputs and their mask; padded positions hold zeros, or `noise` (a Generator) draws."""
    shape = (len(seqs), width, seqs[0].shape[1])
    x = np.zeros(shape, np.float32) if noise is None else noise.normal(size=shape).astype(np.float32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "pre" else slice(0, len(s))
        x[i, sl], mask[i, sl] = s, True
    return x, mask


@pytest.mark.parametrize("side", ["pre", "post"])
def test_bidirectional_layer_matches_numpy_on_ragged_batch(side):
    rng = np.random.default_rng(0)
    lengths, features, hidden, width = [7, 3, 1, 5], 6, 5, 9
    seqs = [rng.normal(size=(n, features)).astype(np.float32) for n in lengths]
    layer = recurrent.RecurrentLayer("lstm", features, hidden, bidirectional=True, rngs=nnx.Rngs(1))
    for cell in (layer.forward, layer.backward):  # zero biases and zero padding keep the state at 0,
        cell.bias[...] = rng.normal(size=cell.bias.shape)  # hiding a state that reads padding
    x, mask = pad_batch(seqs, width, side, noise=rng)  # padding that would move the state if read
    final, outputs = layer(jnp.asarray(x), jnp.asarray(mask))
    final, outputs = np.asarray(final), np.asarray(outputs)
    for i, s in enumerate(seqs):
        fwd = numpy_lstm(s.astype(np.float64), *cell_weights(layer.forward))
        # The backward direction reads each sequence's own tokens last-to-first.
        bwd = numpy_lstm(s[::-1].astype(np.float64), *cell_weights(layer.backward))[::-1]
        expected = np.concatenate([fwd, bwd], axis=-1)
        np.testing.assert_allclose(outputs[i][mask[i]], expected, atol=1e-5)
        np.testing.assert_allclose(outputs[i][~mask[i]], 0.0)
        np.testing.assert_allclose(final[i], np.concatenate([fwd[-1], bwd[0]]), atol=1e-5)


def make_classifier(pooling, bidirectional=True, **kw):
    return recurrent.RecurrentClassifier(vocab_size=50, num_outputs=3, embed_dim=8, hidden_sizes=(6, 4),
                                         bidirectional=bidirectional, pooling=pooling, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("cell,pooling", [("lstm", p) for p in recurrent.POOLINGS] +
                         [(c, "mean_max") for c in sorted(recurrent.CELLS) if c != "lstm"] +
                         [("lstm-bfloat16", "attention")])
def test_padding_never_changes_the_prediction(pooling, cell):
    cell, _, dtype = cell.partition("-")
    model = make_classifier(pooling, bidirectional=(True, False), cell=cell, head_sizes=(5,),
                            dtype=jnp.dtype(dtype or "float32"))
    apply = nnx.jit(lambda m, ids, mask: m(ids, mask))
    rng = np.random.default_rng(1)
    tokens = [rng.integers(2, 50, size=n) for n in (4, 9, 1)]
    reference = []
    for t in tokens:  # each sequence alone, no padding at all
        ids = jnp.asarray(t[None])
        reference.append(np.asarray(apply(model, ids, jnp.ones_like(ids, bool)))[0])
    for side in ("pre", "post"):
        for width in (9, 16):
            x, mask = pad_batch([t[:, None] for t in tokens], width, side)
            # Padding positions hold junk ids: the mask alone must decide what is read.
            ids = np.where(mask, x[..., 0], 7).astype(np.int32)
            logits = np.asarray(apply(model, jnp.asarray(ids), jnp.asarray(mask)))
            np.testing.assert_allclose(logits, np.stack(reference), atol=1e-5 if not dtype else 1e-3,
                                       err_msg=f"{side} {width}")


def test_empty_sequence_pools_to_finite_values():
    model = make_classifier("mean_max")
    ids = jnp.zeros((2, 5), jnp.int32)
    mask = jnp.zeros((2, 5), bool)
    assert np.isfinite(np.asarray(model(ids, mask))).all()


@pytest.mark.parametrize("rates", [{"dropout": 0.5, "embed_dropout": 0.5}, {"word_dropout": 0.5}])
def test_dropout_is_active_only_in_training(rates):
    model = make_classifier("mean", **rates)
    ids = jnp.asarray(np.arange(2, 12).reshape(2, 5))
    mask = jnp.ones_like(ids, bool)
    a = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(0)))
    b = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(1)))
    assert not np.allclose(a, b)
    np.testing.assert_allclose(model(ids, mask), model(ids, mask))


def test_word_dropout_drops_whole_tokens():
    model = make_classifier("mean", word_dropout=0.5)
    x = jnp.ones((4, 30, 8))
    y = np.asarray(model.word_dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(0))))
    dropped = (y == 0).all(-1)
    assert ((y == 0) | (y == 2.0)).all() and (dropped == (y == 0).any(-1)).all()  # a token is all in or all out
    assert 0.2 < dropped.mean() < 0.8


def reference_layer(layer, x, mask):
    """The same layer through the generic scan and JAX's own autodiff: two separate directions."""
    final, outputs = recurrent.generic_scan(layer.forward, x, mask, reverse=False)
    if layer.backward is not None:
        final_b, outputs_b = recurrent.generic_scan(layer.backward, x, mask, reverse=True)
        final, outputs = jnp.concatenate([final, final_b], -1), jnp.concatenate([outputs, outputs_b], -1)
    return final, outputs


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_lstm_fast_path_matches_autodiff_of_generic_scan(side, bidirectional):
    """One fused scan with a hand-written VJP: same values and gradients as two autodiff scans."""
    rng = np.random.default_rng(2)
    seqs = [rng.normal(size=(n, 6)).astype(np.float32) for n in (7, 3, 1, 9)]
    x, mask = pad_batch(seqs, 9, side)
    x, mask = jnp.asarray(x), jnp.asarray(mask)
    mask = mask.at[2].set(False)  # an empty row too
    layer = recurrent.RecurrentLayer("lstm", 6, 5, bidirectional, unroll=2, rngs=nnx.Rngs(3))
    width = layer.out_features
    w_out = jnp.asarray(rng.normal(size=(4, 9, width)), jnp.float32)
    w_final = jnp.asarray(rng.normal(size=(4, width)), jnp.float32)
    assert_matches_generic_scan(layer, x, mask, w_out, w_final, tol=1e-5)


def assert_matches_generic_scan(layer, x, mask, w_out, w_final, tol):
    """Value and gradients (parameters and x) of `layer` equal to autodiff of the generic scan's, through a
    loss weighting every output by `w_out` and every final state by `w_final`."""
    graphdef, params = nnx.split(layer)

    def loss(params, x, fast):
        model = nnx.merge(graphdef, params)
        final, outputs = model(x, mask) if fast else reference_layer(model, x, mask)
        return jnp.sum(outputs * w_out) + jnp.sum(jnp.tanh(final) * w_final)

    fast, slow = (jax.value_and_grad(loss, argnums=(0, 1))(params, x, f) for f in (True, False))
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


def test_scan_direction_reverse_uses_the_fast_path_exactly():
    rng = np.random.default_rng(4)
    x, mask = pad_batch([rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 6)], 6, "pre")
    cell = recurrent.LSTMCell(3, 4, rngs=nnx.Rngs(0))
    for reverse in (False, True):
        fast = recurrent.scan_direction(cell, jnp.asarray(x), jnp.asarray(mask), reverse=reverse)
        slow = recurrent.generic_scan(cell, jnp.asarray(x), jnp.asarray(mask), reverse=reverse)
        for a, b in zip(fast, slow):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_lstm_bfloat16_matmuls_track_the_float32_reference(side):
    """bfloat16 matmul operands only: outputs and float32 gradients stay within bfloat16 rounding."""
    rng = np.random.default_rng(5)
    x, mask = pad_batch([rng.normal(size=(n, 16)).astype(np.float32) for n in (30, 12, 25)], 30, side)
    layer = recurrent.RecurrentLayer("lstm", 16, 32, True, rngs=nnx.Rngs(6))
    assert_bfloat16_tracks_float32(layer, x, mask, jnp.asarray(rng.normal(size=(3, 30, 64)), jnp.float32))


def assert_bfloat16_tracks_float32(layer, x, mask, w_out):
    """Value and float32 gradients of `layer` on bfloat16 inputs within bfloat16 rounding of the float32
    generic scan's, through a loss weighting every output by `w_out`."""
    graphdef, params = nnx.split(layer)

    def loss(params, x, fast):
        model = nnx.merge(graphdef, params)
        final, outputs = model(x, mask) if fast else reference_layer(model, x, mask)
        return jnp.sum(outputs.astype(jnp.float32) * w_out) + jnp.sum(final.astype(jnp.float32))

    low = jax.value_and_grad(loss)(params, jnp.asarray(x, jnp.bfloat16), True)
    ref = jax.value_and_grad(loss)(params, jnp.asarray(x), False)
    for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(ref)):
        assert a.dtype == jnp.float32
        # bfloat16 keeps 8 mantissa bits; measured relative errors here are 0.2-0.5%.
        assert np.linalg.norm(a - b) <= 0.02 * np.linalg.norm(b)
