"""The cuDNN LSTM path, run with JAX's reference implementation of the cuDNN kernel in its place.

No GPU here or in CI: `jax.experimental.rnn.lstm_ref` computes what the cuDNN call does, from the
flat weights as `jax.experimental.rnn.unpack_lstm_weights` reads cuDNN's layout. That checks our
weight packing, the alignment of either padding side, final states and the batch-sharded call
against the scan. The cuDNN kernel itself only runs on a CUDA GPU, where the value and gradient test
runs once more with it (skipped elsewhere).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import rnn

from sentiment_jax import config_base, models
from sentiment_jax.models import recurrent
from test_recurrent import pad_batch
from test_scale import COMMON, files, train_steps  # noqa: F401 (fixture)
from test_train import tiny_config


def reference_kernel(x, h0, c0, weights, lengths, *, input_size, hidden_size, bidirectional):
    unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, 1, bidirectional)
    return rnn.lstm_ref(x, h0, c0, *unpacked, lengths, input_size, hidden_size, 1, 0.0, bidirectional)


@pytest.fixture(params=["reference", pytest.param("cudnn", marks=pytest.mark.skipif(
    not recurrent.cudnn_available(), reason="cuDNN needs a CUDA GPU"))])
def tolerance(request, monkeypatch):
    """Runs 'cudnn' layers with JAX's reference kernel anywhere, or with cuDNN itself on a CUDA GPU;
    returns how closely they must match the scan (GPUs may use TF32 matmuls)."""
    if request.param == "reference":
        monkeypatch.setattr(recurrent, "_cudnn_kernel", reference_kernel)
        return 1e-5
    return 1e-3


@pytest.fixture
def reference_cudnn(monkeypatch):
    """Builds 'cudnn' layers on CPU, with the reference kernel standing in for cuDNN; lists its calls."""
    calls = []

    def kernel(x, *args, **kwargs):
        calls.append(x.shape)
        return reference_kernel(x, *args, **kwargs)

    monkeypatch.setattr(recurrent, "_cudnn_kernel", kernel)
    monkeypatch.setattr(recurrent, "cudnn_available", lambda: True)
    return calls


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_cudnn_layer_matches_the_scan_in_values_and_gradients(tolerance, side, bidirectional):
    rng = np.random.default_rng(0)
    x, mask = pad_batch([rng.normal(size=(n, 6)).astype(np.float32) for n in (7, 3, 1, 9)], 9, side)
    x, mask = jnp.asarray(x), jnp.asarray(mask).at[2].set(False)  # and an empty row
    scan = recurrent.RecurrentLayer("lstm", 6, 5, bidirectional, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(scan)
    cudnn = nnx.merge(nnx.split(recurrent.RecurrentLayer("lstm", 6, 5, bidirectional, backend="cudnn",
                                                         rngs=nnx.Rngs(1)))[0], params)
    w_out = jnp.asarray(rng.normal(size=(4, 9, scan.out_features)), jnp.float32)

    def loss(params, x, layer):
        final, outputs = nnx.merge(nnx.graphdef(layer), params)(x, mask)
        return jnp.sum(outputs * w_out) + jnp.sum(jnp.tanh(final))

    assert cudnn_weights_size(scan) == rnn.get_num_params_in_lstm(6, 5, 1, bidirectional)
    for a, b in zip(scan(x, mask), cudnn(x, mask)):
        np.testing.assert_allclose(a, b, atol=tolerance)
    ours, ref = (jax.value_and_grad(loss, argnums=(0, 1))(params, x, layer) for layer in (cudnn, scan))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=tolerance, rtol=tolerance)


def cudnn_weights_size(layer) -> int:
    return recurrent.cudnn_weights([c for c in (layer.forward, layer.backward) if c is not None]).size


def test_cudnn_training_on_eight_devices_matches_the_scan_on_one(files, reference_cudnn):  # noqa: F811
    """Per-device cuDNN calls (shard_map over the batch) give the single-device scan's losses and weights."""
    scan_losses, scan_state = train_steps(tiny_config(files, **COMMON, **{"mesh.num_devices": 1}))
    losses, state = train_steps(tiny_config(files, **COMMON, **{"model.lstm_backend": "cudnn"}))
    assert reference_cudnn and all(shape[0] == 2 for shape in reference_cudnn)  # 16 rows over 8 devices
    np.testing.assert_allclose(losses, scan_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(scan_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.skipif(not recurrent.cudnn_available(), reason="cuDNN needs a CUDA GPU")
def test_cudnn_training_matches_the_scan_on_one_device(files):  # noqa: F811
    """The real kernel inside the jitted train step: three steps give the scan's losses and weights."""
    one = {**COMMON, "mesh.num_devices": 1}
    scan_losses, scan_state = train_steps(tiny_config(files, **one))
    losses, state = train_steps(tiny_config(files, **one, **{"model.lstm_backend": "cudnn"}))
    np.testing.assert_allclose(losses, scan_losses, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(scan_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.skipif(recurrent.cudnn_available(), reason="checks the fallback where there is no GPU")
def test_cudnn_falls_back_to_the_scan_without_a_gpu():
    cfg = config_base.base_config().model
    cfg.lstm_backend = "cudnn"
    model = models.build_model(cfg, 50, 2, nnx.Rngs(0))
    assert jax.default_backend() != "gpu" and model.layers[0].backend == "scan"
