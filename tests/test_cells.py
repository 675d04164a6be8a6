"""GRU and SimpleRNN layers against independent NumPy implementations, on ragged batches."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sentiment_jax.models import recurrent


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_gru(x, w_x, w_h, b_x, b_h):
    """GRU over one unpadded sequence x [T, F] (PyTorch's equations, gates r, z, n). Returns [T, H]."""
    hidden = w_h.shape[0]
    gate = lambda a, k: a[..., k * hidden:(k + 1) * hidden]
    h, out = np.zeros(hidden), []
    for x_t in x:
        xp, hp = x_t @ w_x + b_x, h @ w_h + b_h
        r = sigmoid(gate(xp, 0) + gate(hp, 0))
        z = sigmoid(gate(xp, 1) + gate(hp, 1))
        n = np.tanh(gate(xp, 2) + r * gate(hp, 2))
        h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out)


def numpy_rnn(x, w_x, w_h, b_x):
    """Elman RNN h_t = tanh(x_t W_x + h_{t-1} W_h + b) over x [T, F]. Returns [T, H]."""
    h, out = np.zeros(w_h.shape[0]), []
    for x_t in x:
        h = np.tanh(x_t @ w_x + h @ w_h + b_x)
        out.append(h)
    return np.stack(out)


# One compiled program per shape (eager calls would retrace the scan on every call).
run_layer = nnx.jit(lambda layer, x, mask: layer(x, mask))


def reference(cell_name, cell, x):
    f64 = lambda p: np.asarray(p[...], np.float64)
    weights = [f64(cell.input_kernel), f64(cell.recurrent_kernel), f64(cell.bias)]
    if cell_name == "gru":
        return numpy_gru(x, *weights, f64(cell.recurrent_bias))
    return numpy_rnn(x, *weights)


def randomise(layer, rng):
    """Non-zero biases, so a mixed-up bias (input vs recurrent) cannot pass unnoticed."""
    for cell in (layer.forward, layer.backward):
        for name in ("bias", "recurrent_bias"):
            if hasattr(cell, name):
                p = getattr(cell, name)
                p[...] = jnp.asarray(rng.normal(scale=0.5, size=p.shape), jnp.float32)


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("cell_name", ["gru", "rnn"])
def test_bidirectional_layer_matches_numpy_on_ragged_batch(cell_name, side):
    rng = np.random.default_rng(0)
    lengths, features, hidden, width = [6, 2, 1, 4], 5, 3, 8
    seqs = [rng.normal(size=(n, features)) for n in lengths]
    layer = recurrent.RecurrentLayer(cell_name, features, hidden, bidirectional=True, rngs=nnx.Rngs(2))
    randomise(layer, rng)
    x = np.zeros((len(seqs), width, features), np.float32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if side == "pre" else slice(0, len(s))
        x[i, where], mask[i, where] = s, True
    final, outputs = (np.asarray(a) for a in run_layer(layer, jnp.asarray(x), jnp.asarray(mask)))
    for i, s in enumerate(seqs):
        s = s.astype(np.float32).astype(np.float64)
        fwd = reference(cell_name, layer.forward, s)
        bwd = reference(cell_name, layer.backward, s[::-1])[::-1]  # reads the text last-to-first
        np.testing.assert_allclose(outputs[i][mask[i]], np.concatenate([fwd, bwd], -1), atol=1e-5)
        np.testing.assert_allclose(outputs[i][~mask[i]], 0.0)
        np.testing.assert_allclose(final[i], np.concatenate([fwd[-1], bwd[0]]), atol=1e-5)
