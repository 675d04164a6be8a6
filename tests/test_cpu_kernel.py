"""The LSTM recurrence as CPU custom calls (`model.lstm_backend="cpu_kernel"`), against the NumPy
LSTM and JAX's autodiff of the generic scan, which share no code with it."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from sentiment_jax import config_base, cpu_kernels, cpu_setup, export, exported, models, runs, train
from sentiment_jax.models import recurrent
from test_recurrent import (assert_bfloat16_tracks_float32, assert_matches_generic_scan, cell_weights, numpy_lstm,
                            pad_batch)
from test_scale import COMMON, files, train_steps  # noqa: F401 (fixture)

pytestmark = [pytest.mark.skipif(jax.default_backend() != "cpu", reason="custom calls for CPUs"),
              pytest.mark.skipif(cpu_setup.compiler() is None, reason="the kernel is built with a C++ compiler")]


def kernel_layer(features, hidden, bidirectional, seed=1):
    return recurrent.RecurrentLayer("lstm", features, hidden, bidirectional, backend="cpu_kernel",
                                    rngs=nnx.Rngs(seed))


# Hidden 5: the plain matmul loop; 64: the packed, register-blocked one (4H and H multiples of the panel).
@pytest.mark.parametrize("hidden", [5, 64])
@pytest.mark.parametrize("side", ["pre", "post"])
def test_matches_numpy_on_a_ragged_batch_with_junk_padding(side, hidden):
    rng = np.random.default_rng(0)
    lengths, features, width = [7, 3, 1, 9, 5, 2], 6, 9
    seqs = [rng.normal(size=(n, features)).astype(np.float32) for n in lengths]
    layer = kernel_layer(features, hidden, bidirectional=True)
    for cell in (layer.forward, layer.backward):  # random biases: a state reading padding would move
        cell.bias[...] = rng.normal(size=cell.bias.shape)
    x, mask = pad_batch(seqs, width, side, noise=rng)
    final, outputs = (np.asarray(a) for a in layer(jnp.asarray(x), jnp.asarray(mask)))
    for i, s in enumerate(seqs):
        fwd = numpy_lstm(s.astype(np.float64), *cell_weights(layer.forward))
        bwd = numpy_lstm(s[::-1].astype(np.float64), *cell_weights(layer.backward))[::-1]
        np.testing.assert_allclose(outputs[i][mask[i]], np.concatenate([fwd, bwd], -1), atol=2e-6)
        np.testing.assert_array_equal(outputs[i][~mask[i]], 0.0)
        np.testing.assert_allclose(final[i], np.concatenate([fwd[-1], bwd[0]]), atol=2e-6)


@pytest.mark.parametrize("hidden", [5, 64])
@pytest.mark.parametrize("side", ["pre", "post"])
def test_gradients_match_autodiff_of_the_generic_scan(side, hidden):
    rng = np.random.default_rng(2)
    seqs = [rng.normal(size=(n, 6)).astype(np.float32) for n in (7, 3, 1, 9, 4)]
    x, mask = pad_batch(seqs, 9, side, noise=rng)
    x, mask = jnp.asarray(x), jnp.asarray(mask).at[2].set(False)  # an empty row too
    layer = kernel_layer(6, hidden, bidirectional=True, seed=3)
    for cell in (layer.forward, layer.backward):
        cell.bias[...] = jnp.asarray(rng.normal(size=cell.bias.shape), jnp.float32)
    w_out = jnp.asarray(rng.normal(size=(5, 9, layer.out_features)), jnp.float32)
    w_final = jnp.asarray(rng.normal(size=(5, layer.out_features)), jnp.float32)
    assert_matches_generic_scan(layer, x, mask, w_out, w_final, tol=2e-5)


# 16 inputs: AMX for h @ W_h only; 32 inputs and 64 rows: the input projection on AMX too, in blocks of 32 rows.
@pytest.mark.parametrize("features,rows", [(16, 32), (32, 64)])
def test_bfloat16_matmuls_track_the_float32_reference(features, rows):
    """A bfloat16 model of 64 units: the per-step matmuls on AMX bfloat16 tiles where the CPU has them
    (else float32) stay within bfloat16 rounding of the float32 reference."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 31, rows)
    x, mask = pad_batch([rng.normal(size=(n, features)).astype(np.float32) for n in lengths], 30, "pre")
    layer = kernel_layer(features, 64, bidirectional=True, seed=6)
    assert_bfloat16_tracks_float32(layer, x, mask, jnp.asarray(rng.normal(size=(rows, 30, 128)), jnp.float32))


# 50 rows: uneven ranges of 25 / 17, 17, 16; 48 rows of bfloat16: ranges of 16 rows, as AMX tiles take.
@pytest.mark.parametrize("dtype,rows", [(jnp.float32, 50), (jnp.bfloat16, 48)])
def test_rows_split_over_threads_give_the_same_bits(monkeypatch, dtype, rows):
    """With one device per core each call runs on one thread; a device with several cores splits its rows."""
    rng = np.random.default_rng(7)
    x, mask = pad_batch([rng.normal(size=(n, 8)).astype(np.float32) for n in rng.integers(1, 13, rows)], 12, "post")
    layer = kernel_layer(8, 32, bidirectional=True, seed=8)
    graphdef, params = nnx.split(layer)

    def value_and_grad(threads):
        monkeypatch.setattr(cpu_kernels, "threads_per_device", lambda: threads)
        loss = lambda p, x: sum(jnp.sum(jnp.sin(a.astype(jnp.float32))) for a in nnx.merge(graphdef, p)(x, mask))
        return jax.value_and_grad(loss, argnums=(0, 1))(params, jnp.asarray(x, dtype))

    one = value_and_grad(1)
    for threads in (2, 3):
        for a, b in zip(jax.tree.leaves(value_and_grad(threads)), jax.tree.leaves(one)):
            np.testing.assert_array_equal(a, b)


def test_a_non_finite_input_reaches_the_output():
    """The divergence check sees NaN loss: the kernel's own exp must not swallow it."""
    layer = kernel_layer(4, 64, bidirectional=False)
    x = jnp.ones((2, 5, 4)).at[1, 2, 0].set(jnp.nan)
    final, outputs = layer(x, jnp.ones((2, 5), bool))
    assert np.isfinite(np.asarray(final[0])).all() and np.isnan(np.asarray(final[1])).all()


def test_training_on_eight_devices_matches_the_scan_on_one(files):  # noqa: F811
    """Each device runs the custom calls on its rows (shard_map); the weight gradients are summed over them."""
    scan_losses, scan_state = train_steps(tiny_config(files, **COMMON, **{"mesh.num_devices": 1}))
    losses, state = train_steps(tiny_config(files, **COMMON, **{"model.lstm_backend": "cpu_kernel"}))
    np.testing.assert_allclose(losses, scan_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(scan_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_kernel_run_exports_on_the_scan(files, tmp_path):  # noqa: F811
    """An export holds no custom call of this machine: the scan in its place gives the run's probabilities."""
    cfg = tiny_config(files, **{"train.epochs": 1, "model.lstm_backend": "cpu_kernel", "mesh.num_devices": 1})
    train.train_and_evaluate(cfg, tmp_path / "run")
    run = runs.load(tmp_path / "run")
    assert run.model.layers[0].backend == "cpu_kernel" and runs.portable(run).model.layers[0].backend == "scan"
    folder = export.export_run(tmp_path / "run", tmp_path / "export")
    assert not any(name.encode() in p.read_bytes() for p in folder.glob("*.jaxexport")
                   for name in cpu_kernels.TARGETS.values())
    texts = ["great lovely film", "awful dull plot", "the"]
    np.testing.assert_allclose(exported.load(folder, batch_sizes=(4,)).predict(texts), run.predict(texts), atol=1e-5)


def test_auto_takes_the_kernel_where_it_builds_and_the_scan_where_not(monkeypatch):
    cfg = config_base.base_config().model
    cfg.lstm_backend = "auto"
    assert models.build_model(cfg, 50, 2, nnx.Rngs(0)).layers[0].backend == "cpu_kernel"

    def fails():
        raise cpu_kernels.KernelError("no compiler")

    monkeypatch.setattr(cpu_kernels, "register", fails)
    assert models.build_model(cfg, 50, 2, nnx.Rngs(0)).layers[0].backend == "scan"
    cfg.lstm_backend = "cpu_kernel"  # asked for by name: an error
    with pytest.raises(cpu_kernels.KernelError, match="no compiler"):
        models.build_model(cfg, 50, 2, nnx.Rngs(0))


def test_without_a_compiler_the_build_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SENTIMENT_JAX_CACHE", str(tmp_path))  # no library built yet
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cpu_setup.shutil, "which", lambda name: None)
    with pytest.raises(cpu_kernels.KernelError, match=r"needs a C\+\+17 compiler .* set --config.model.lstm_backend=scan"):
        cpu_kernels.build()
    assert not list(tmp_path.rglob("*.so"))


def test_a_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SENTIMENT_JAX_CACHE", str(tmp_path))
    source = tmp_path / "broken.cc"
    source.write_text("int main() { return undeclared; }\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    with pytest.raises(cpu_kernels.KernelError, match=r"compiling broken.cc failed \(.*error.*undeclared"):
        cpu_kernels.build()
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.skipif("avx512f" not in cpu_setup.machine_flags(), reason="without AVX-512 the usual build is this one")
def test_the_avx2_build_matches_numpy_and_autodiff(monkeypatch):
    """The AVX2 micro-kernels (CPUs without AVX-512) on a newer CPU: built under XLA's instruction-set cap,
    as a library of its own."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa=AVX2")
    usual = cpu_kernels._library_path(cpu_setup.compiler())
    monkeypatch.setenv("XLA_FLAGS", env["XLA_FLAGS"])
    assert cpu_kernels._library_path(cpu_setup.compiler()) != usual
    tests = [f"{__file__}::test_matches_numpy_on_a_ragged_batch_with_junk_padding",
             f"{__file__}::test_gradients_match_autodiff_of_the_generic_scan"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "8 passed" in proc.stdout
