"""Scale-out: mesh layouts, several processes, checkpoints across topologies, bf16, launch scripts."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_batches
from sentiment_jax import checkpoints, config_base, models, runs, sharding, train
from sentiment_jax import state as state_lib
from sentiment_jax import steps as train_steps_lib
from test_train import REPO, step_losses, tiny_config, write_dataset

# A constant learning rate makes a 1-epoch run a prefix of a 2-epoch one (resume tests).
COMMON = {"train.schedule": "constant", "train.epochs": 2, "model.dropout": 0.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n_train=80, n_test=32)


@pytest.fixture(scope="module")
def one_device_run(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    return workdir, train.train_and_evaluate(tiny_config(files, **COMMON, **{"mesh.num_devices": 1}), workdir)


def train_steps(cfg, steps=3, vocab=64):
    """Losses of a few train steps on fixed batches, and the final state."""
    mesh = sharding.make_mesh(cfg.mesh)
    state, setup = state_lib.create_state(cfg, mesh, vocab, 2, total_steps=10)
    step_fn, losses = train_steps_lib.make_train_step(setup), []
    for batch in random_batches(steps, vocab):
        state, sums = step_fn(state, sharding.put_batch(batch, setup.batch_sharding),
                              train_steps_lib.zero_metrics(mesh))
        losses.append(float(sums["loss_sum"] / sums["count"]))
    return losses, state


def sharded_fraction(tree) -> float:
    """Share of elements held in pieces smaller than the whole array."""
    leaves = jax.tree.leaves(tree)
    split = sum(x.size for x in leaves if x.sharding.shard_shape(x.shape) != x.shape)
    return split / sum(x.size for x in leaves)


def test_tensor_parallel_and_hybrid_layouts_give_the_data_parallel_losses(files):
    """Split contractions sum in another order: Adam at a modest rate keeps that at ~1e-5. (FSDP alone
    trains a whole run in test_saved_on_eight_devices_restores_on_one_and_other_mesh_shapes.)"""
    cfg = tiny_config(files, **{"model.pooling": "mean_max", "model.head_sizes": (8,), "train.learning_rate": 1e-3})
    reference, _ = train_steps(config_base.set_layout(cfg, "dp"))
    for layout in ("tp", (2, 2, 2)):
        if isinstance(layout, tuple):
            cfg.mesh.shape = layout
        else:
            config_base.set_layout(cfg, layout)
        losses, state = train_steps(cfg)
        np.testing.assert_allclose(losses, reference, rtol=5e-5, err_msg=str(layout))
        # The layout really splits the parameters and the optimizer state like them.
        assert sharded_fraction(state.params) > 0.8, layout
        assert sharded_fraction(state.opt_state) > 0.8, layout


def test_transformer_attention_and_mlp_shard_too():
    """Heads and MLP columns over "model", embeddings over "fsdp": the hybrid mesh matches DP."""
    from configs import transformer

    cfg = transformer.get_config("imdb")
    cfg.model.embed_dim, cfg.model.num_layers, cfg.model.num_heads, cfg.model.mlp_dim = 16, 1, 4, 32
    cfg.model.dropout = cfg.model.embed_dropout = 0.0
    cfg.data.max_length, cfg.model.max_positions = 12, 16
    cfg.train.batch_size, cfg.train.learning_rate = 16, 1e-3
    reference, _ = train_steps(config_base.set_layout(cfg, "dp"))
    cfg.mesh.shape = (2, 2, 2)
    losses, state = train_steps(cfg)
    np.testing.assert_allclose(losses, reference, rtol=5e-5)
    assert sharded_fraction(state.params) > 0.9


def test_use_cpu_devices_makes_single_threaded_devices_and_keeps_other_xla_flags():
    """In a fresh process: JAX reads these settings only when it first creates its CPU backend."""
    code = ("import os, jax; from sentiment_jax import sharding; sharding.use_cpu_devices(3); "
            "print(len(jax.devices()), os.environ['XLA_FLAGS'])")
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_fast_math=false", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "--xla_cpu_enable_fast_math=false", "--xla_cpu_multi_thread_eigen=false"]


def test_layout_is_a_config_variant():
    from configs import lstm

    assert lstm.get_config("imdb,fsdp").mesh.shape == (1, -1, 1)
    assert lstm.get_config("tp").data.name == "imdb"
    assert lstm.get_config("nusax").mesh.shape == (-1, 1, 1)
    assert lstm.get_config("nusax,tp").data.name == "nusax_senti"
    with pytest.raises(ValueError, match="unknown layout"):
        lstm.get_config("imdb,zigzag")


def test_bfloat16_computes_in_bf16_and_keeps_float32_parameters_and_optimizer_state(files):
    cfg = tiny_config(files, **{"model.dtype": "bfloat16", "model.head_sizes": (8,)})
    model = models.build_model(cfg.model, 64, 2, nnx.Rngs(params=0))
    batch = next(random_batches(1, 64))
    jaxpr = jax.make_jaxpr(lambda ids, mask: model(ids, mask))(batch["ids"], batch["mask"])

    def matmul_dtypes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield tuple(v.aval.dtype for v in eqn.invars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from matmul_dtypes(sub)

    dtypes = list(matmul_dtypes(jaxpr.jaxpr))
    assert len(dtypes) >= 4 and all(d == (jnp.bfloat16, jnp.bfloat16) for d in dtypes), dtypes
    losses, state = train_steps(cfg, steps=2)
    assert np.all(np.isfinite(losses))
    for tree in (state.params, state.opt_state):
        assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {jnp.dtype(jnp.float32)}


def restored_model(cfg, workdir, step):
    """The `model` item of a checkpoint restored onto cfg's mesh, as host arrays."""
    run = runs.load(workdir, step, mesh_config=cfg.mesh)
    model = {"params": run.params, "rest": run.rest}
    assert all(x.sharding.mesh.shape == sharding.make_mesh(cfg.mesh).shape for x in jax.tree.leaves(model))
    return jax.tree.map(np.asarray, model)


def assert_same_everywhere(files, workdir, result, meshes):
    """Every target mesh restores identical parameters and reports the same test metrics."""
    step, reference = result["checkpoint_step"], None
    for overrides in meshes:
        cfg = tiny_config(files, **COMMON, **overrides)
        params = restored_model(cfg, workdir, step)
        if reference is None:
            reference = params
        jax.tree.map(np.testing.assert_array_equal, params, reference)
        report = train.evaluate(workdir, which=step, mesh_config=cfg.mesh)
        assert (report["accuracy"], report["confusion_matrix"]) == (result["accuracy"], result["confusion_matrix"])


def test_saved_on_one_device_restores_on_eight_and_other_mesh_shapes(files, one_device_run):
    workdir, result = one_device_run
    assert_same_everywhere(files, workdir, result, [{"mesh.shape": (8, 1, 1)}, {"mesh.shape": (2, 2, 2)}])


def test_saved_on_eight_devices_restores_on_one_and_other_mesh_shapes(files, one_device_run, tmp_path):
    cfg = tiny_config(files, **COMMON, **{"mesh.shape": (1, 8, 1)})  # FSDP: saved in pieces
    result = train.train_and_evaluate(cfg, tmp_path)
    np.testing.assert_allclose([l for _, l in step_losses(tmp_path)],
                               [l for _, l in step_losses(one_device_run[0])], rtol=1e-5)
    assert_same_everywhere(files, tmp_path, result, [{"mesh.num_devices": 1}, {"mesh.shape": (1, 1, 8)}])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_resume_on_one(files, one_device_run, tmp_path):
    """launch/local.sh: 2 CPU processes x 1 device, same global batch as the 1-device run."""
    config = tmp_path / "tiny_config.py"
    overrides = {**COMMON, "train.epochs": 1}
    config.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                      "from test_train import tiny_config\n\n\ndef get_config():\n"
                      f"    return tiny_config({ {k: str(v) for k, v in files.items()}!r}, **{overrides!r})\n")
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(free_port()),
           "LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run([str(REPO / "launch" / "local.sh"), "2", f"--config={config}", f"--workdir={workdir}"],
                         env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(f.read_text()[-1500:] for f in sorted((tmp_path / "logs").glob("*.log")))
    assert out.returncode == 0, out.stderr[-1000:] + logs
    assert "2 devices, mesh {'data': 2" in out.stdout
    reference = step_losses(one_device_run[0])
    losses = step_losses(workdir)
    assert len(losses) == len(reference) // 2
    np.testing.assert_allclose([l for _, l in losses], [l for _, l in reference[:len(losses)]], rtol=1e-5)

    # The checkpoint records the process count; one process resumes it exactly, in global terms.
    mngr = checkpoints.manager(workdir, tiny_config(files).checkpoint, read_only=True)
    meta = checkpoints.restore(mngr, mngr.latest_step(), meta=None)["meta"]
    mngr.close()
    assert (meta["process_count"], meta["global_batch_size"]) == (2, 16)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    result = train.train_and_evaluate(tiny_config(files, **COMMON, **{"mesh.num_devices": 1}), resumed)
    np.testing.assert_allclose([l for _, l in step_losses(resumed)], [l for _, l in reference], rtol=1e-5)
    assert result["accuracy"] == one_device_run[1]["accuracy"]
    with pytest.raises(ValueError, match="train.batch_size is 16 there, 8 here"):
        train.train_and_evaluate(tiny_config(files, **COMMON, **{"train.batch_size": 8}), resumed)


def test_tpu_script_dry_run_prints_the_gcloud_commands_for_a_v4_32():
    out = subprocess.run([str(REPO / "launch" / "tpu_vm.sh"), "--name=sj", "--zone=us-central2-b",
                          "--accelerator-type=v4-32", "--workdir=/mnt/shared/run", "--dry-run", "create", "copy",
                          "install", "run", "logs", "delete", "--", "--config=configs/lstm.py:imdb,fsdp"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    gcloud = [l for l in lines if l.startswith("gcloud ")]
    assert len(gcloud) == 6 and len(lines) == 7  # and the local `git archive`
    assert gcloud[0] == ("gcloud compute tpus tpu-vm create sj --zone=us-central2-b --accelerator-type=v4-32 "
                         "--version=tpu-ubuntu2204-base")
    assert gcloud[1].startswith("gcloud compute tpus tpu-vm scp /tmp/sentiment_jax.tar.gz") and "--worker=all" in gcloud[1]
    assert "--worker=all" in gcloud[2] and "jax[tpu]==" in gcloud[2]
    assert "--worker=all" in gcloud[3] and ("python3 -m sentiment_jax.main --workdir=/mnt/shared/run "
                                            "--config=configs/lstm.py:imdb,fsdp") in gcloud[3]
    assert "--worker=0" in gcloud[4] and "tail" in gcloud[4]
    assert gcloud[5] == "gcloud compute tpus tpu-vm delete sj --zone=us-central2-b --quiet"
    bad = subprocess.run([str(REPO / "launch" / "tpu_vm.sh"), "--zone=z", "--dry-run"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--name and --zone are required" in bad.stderr
