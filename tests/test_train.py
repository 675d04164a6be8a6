"""The train loop: 1 vs 8 devices, checkpoints, exact resume, eval-only, the parameter average, and the CLI."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import random_batches, tiny_config, write_dataset
from sentiment_jax import checkpoints, config_base, data, input_pipeline, losses, runs, sharding, state, steps, train

REPO = pathlib.Path(__file__).resolve().parent.parent
def step_losses(workdir):
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(l["step"], l["train/running_loss"]) for l in lines if "train/running_loss" in l]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_run(files, tmp_path_factory):
    """One uninterrupted run on 1 device that several tests compare against: (workdir, result,
    the test report of the parameters held in memory when training ended)."""
    workdir = tmp_path_factory.mktemp("reference")
    cfg, real_loop, end = tiny_config(files, **{"mesh.num_devices": 1}), train.train_loop, {}

    def keep_the_final_state(*args):  # (cfg, state, setup, mngr, writer, batches, encoded, dataset, ...)
        end.update(state=real_loop(*args), setup=args[2], encoded=args[6], dataset=args[7])
        return end["state"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_loop", keep_the_final_state)
        result = train.train_and_evaluate(cfg, workdir)
    setup = end["setup"]
    predict_step = steps.make_predict_step(setup.graphdef, setup.mesh, cfg.mesh, setup.state_sharding.params,
                                           setup.state_sharding.rest, setup.batch_sharding)
    in_memory, _ = train.evaluate_split(cfg, predict_step, end["state"].params, end["state"].rest,
                                        end["encoded"]["test"], end["dataset"].label_names, setup.batch_sharding)
    return workdir, result, in_memory


EMA = {"mesh.num_devices": 1, "train.ema_decay": 0.9}


@pytest.fixture(scope="module")
def ema_run(files, tmp_path_factory):
    """The reference run with train.ema_decay on."""
    workdir = tmp_path_factory.mktemp("ema")
    return workdir, train.train_and_evaluate(tiny_config(files, **EMA), workdir)


def test_training_learns_and_writes_its_artifacts(reference_run):
    workdir, result, _ = reference_run
    assert result["accuracy"] > 0.8, result
    for name in ("config.json", "labels.json", "encoder.json", "metrics.jsonl", "result.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").glob("events.*"))
    epochs = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in l]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert all(e["epoch_seconds"] > 0 for e in epochs)
    train_losses = [e["train/loss"] for e in epochs]  # about 0.68, 0.54, 0.29, 0.20
    assert train_losses == sorted(train_losses, reverse=True) and train_losses[-1] < train_losses[0] / 2, train_losses
    assert epochs[-1]["val/accuracy"] >= 0.8, epochs[-1]  # about 0.91 of 32 examples


def test_eight_devices_give_the_same_losses_as_one(files, reference_run, tmp_path):
    """Batch split over 8 devices: same math, summed in a different order (tolerance 1e-5)."""
    assert len(jax.devices()) == 8
    result = train.train_and_evaluate(tiny_config(files, **{"mesh.num_devices": 8}), tmp_path)
    ref_losses, losses = step_losses(reference_run[0]), step_losses(tmp_path)
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] and len(losses) == 32
    np.testing.assert_allclose([l for _, l in losses], [l for _, l in ref_losses], rtol=1e-5)
    assert result["accuracy"] == reference_run[1]["accuracy"]


def test_eval_only_equals_end_of_training_and_runs_on_another_device_count(files, reference_run):
    workdir, _, in_memory = reference_run
    # The last checkpoint, saved on 1 device and restored on 1 and on 8, against the parameters
    # training ended with (never saved and read back): same predictions, same loss.
    for n in (1, 8):
        report = train.evaluate(workdir, which="latest", mesh_config=tiny_config(files, **{"mesh.num_devices": n}).mesh)
        assert report["confusion_matrix"] == in_memory["confusion_matrix"]
        assert report["loss"] == pytest.approx(in_memory["loss"], rel=1e-6)
    # Temperature scaling asked for at eval time, on a run trained without it: predictions unchanged.
    assert "temperature_scaling" not in report
    scaled = train.evaluate(workdir, which="latest", calibrate=True)
    assert scaled["confusion_matrix"] == in_memory["confusion_matrix"]
    assert scaled["temperature_scaling"]["temperature"] > 0 and scaled["temperature_scaling"]["fitted_on"] == "validation"


def test_a_saved_config_without_a_later_field_loads_with_its_default(reference_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(reference_run[0], old)
    saved = json.loads((old / "config.json").read_text())
    del saved["train"]["ema_decay"], saved["model"]["bag_norm"]  # a run saved before these fields existed
    saved["train"]["retired_field"] = 1  # and one with a field since removed
    (old / "config.json").write_text(json.dumps(saved))
    cfg = runs.load_config(old)
    assert cfg.train.ema_decay == 0.0 and cfg.model.bag_norm == "l1" and "retired_field" not in cfg.train
    assert cfg.model.hidden_sizes == (8,) and cfg.data.max_length == 16  # saved values kept, lists as tuples
    assert train.evaluate(old, which="best")["accuracy"] == reference_run[1]["accuracy"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("ema", [False, True])
def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_does(files, reference_run, ema_run, tmp_path,
                                                                     monkeypatch, ema):
    reference_run = ema_run if ema else reference_run
    cfg = tiny_config(files, **{**(EMA if ema else {"mesh.num_devices": 1}), "checkpoint.every_steps": 3})
    real_batch, calls = input_pipeline.Batches.batch, {"n": 0}

    def crashing_batch(self, indices):
        if self.shuffle:
            calls["n"] += 1
            if calls["n"] == 13:  # mid epoch 2, after the step-9 checkpoint (epoch 1 is 8 steps)
                raise Crash
        return real_batch(self, indices)

    monkeypatch.setattr(input_pipeline.Batches, "batch", crashing_batch)
    with pytest.raises(Crash):
        train.train_and_evaluate(cfg, tmp_path)
    monkeypatch.setattr(input_pipeline.Batches, "batch", real_batch)
    result = train.train_and_evaluate(cfg, tmp_path)
    # Steps 10-12 were logged before the crash and again after the resume from step 9: kept once.
    logged = [r["step"] for r in runs.read_metrics(tmp_path) if "train/running_loss" in r]
    assert logged == [s for s, _ in step_losses(reference_run[0])] == list(range(1, 33))
    assert [r["epoch"] for r in runs.read_metrics(tmp_path, "epoch")] == [1, 2, 3, 4]
    assert len(runs.read_metrics(tmp_path, "test")) == len(runs.read_metrics(tmp_path, "params")) == 1
    assert result["accuracy"] == reference_run[1]["accuracy"]
    assert result["confusion_matrix"] == reference_run[1]["confusion_matrix"]
    # The resumed steps retrace the uninterrupted run's losses exactly.
    ref = dict(step_losses(reference_run[0]))
    for step, loss in step_losses(tmp_path):
        np.testing.assert_allclose(loss, ref[step], rtol=1e-6, err_msg=f"step {step}")
    epochs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l]
    ref_epochs = [json.loads(l) for l in (reference_run[0] / "metrics.jsonl").read_text().splitlines()
                  if '"epoch"' in l]
    assert epochs[-1]["train/loss"] == pytest.approx(ref_epochs[-1]["train/loss"], rel=1e-6)
    # Validation reads the average when it is on: it too was restored exactly.
    assert epochs[-1]["val/loss"] == pytest.approx(ref_epochs[-1]["val/loss"], rel=1e-6)


def ema_steps(files, decay, n=4):
    """Host copies of (params, ema) after each of a few train steps, params split over 8 devices (fsdp)."""
    cfg = config_base.set_layout(tiny_config(files, **{"train.ema_decay": decay}), "fsdp")
    mesh = sharding.make_mesh(cfg.mesh)
    trained, setup = state.create_state(cfg, mesh, 64, 2, total_steps=10)
    step_fn, history = steps.make_train_step(setup, ema_decay=decay), []
    for batch in random_batches(n, 64):
        trained, _ = step_fn(trained, sharding.put_batch(batch, setup.batch_sharding), steps.zero_metrics(mesh))
        history.append(jax.device_get((trained.params, trained.ema)))
    return history, trained


def test_ema_is_the_debiased_moving_average_of_the_params_sharded_like_them(files):
    """Hand-computed in float64: after step t, step s's params have weight d^(t-s) / sum of the weights."""
    decay = 0.8
    history, last = ema_steps(files, decay)
    for t in range(1, len(history) + 1):
        weights = decay ** np.arange(t - 1, -1, -1, dtype=np.float64)
        raw = [jax.tree.leaves(params) for params, _ in history[:t]]
        expected = [sum(w * np.float64(p[i]) for w, p in zip(weights, raw)) / weights.sum()
                    for i in range(len(raw[0]))]
        for e, x in zip(expected, jax.tree.leaves(history[t - 1][1])):
            np.testing.assert_allclose(x, e, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
    shardings = [x.sharding for x in jax.tree.leaves(last.params)]
    assert [x.sharding for x in jax.tree.leaves(last.ema)] == shardings
    assert any(s.shard_shape(x.shape) != x.shape for s, x in zip(shardings, jax.tree.leaves(last.params)))


def test_ema_off_adds_nothing_and_on_does_not_change_training(files):
    """decay 0: no average in the state, so the step is the one from before the option; the average
    only watches: the params it trains are bit for bit those of a run without it."""
    off, last = ema_steps(files, 0.0)
    on, _ = ema_steps(files, 0.8)
    assert last.ema is None and all(ema is None for _, ema in off)
    assert len(jax.tree.leaves(last)) == len(jax.tree.leaves((last.step, last.params, last.rest,
                                                               last.opt_state, last.rng)))
    for (params_off, _), (params_on, _) in zip(off, on):
        for a, b in zip(jax.tree.leaves(params_off), jax.tree.leaves(params_on)):
            np.testing.assert_array_equal(a, b)


def test_validation_checkpoints_and_eval_use_the_average(files, ema_run):
    workdir, result = ema_run
    cfg = tiny_config(files, **EMA)
    last = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in l][-1]
    report = train.evaluate(workdir, split="validation", which="latest")
    assert report["loss"] == pytest.approx(last["val/loss"], rel=1e-6)
    # The raw params, kept for resuming only, give another validation loss.
    run = runs.load(workdir, "latest")
    encoded = train.encode_splits(cfg, data.load_dataset(cfg.data), run.encoder, workdir)
    initial, _ = state.create_state(cfg, run.mesh, run.encoder.vocab_size, 2, total_steps=1)
    with checkpoints.reader(workdir, cfg.checkpoint) as mngr:
        saved = checkpoints.restore(mngr, run.step, train=checkpoints.abstract(state.train_item(initial)))
    raw, _ = train.evaluate_split(cfg, run.predict_step, saved["train"]["params"], run.rest, encoded["validation"],
                                  run.label_names, run.batch_sharding)
    assert abs(raw["loss"] - report["loss"]) > 1e-4


def test_checkpoint_errors_are_one_line(files, reference_run, tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoints"):
        train.evaluate(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint for step 12345"):
        train.evaluate(reference_run[0], which=12345)
    # Corrupt the newest checkpoint's model arrays in a copy of the run.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference_run[0], copy)
    latest = max((copy / "checkpoints").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    for f in (latest / "model").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint step {latest.name} .* unreadable") as info:
        train.evaluate(copy, which="latest")
    assert "delete" not in str(info.value)


def test_resuming_with_the_average_switched_is_a_named_error(files, ema_run, tmp_path):
    import shutil

    shutil.copytree(ema_run[0], tmp_path / "run")
    cfg = tiny_config(files, **{**EMA, "train.ema_decay": 0.0, "train.epochs": 5})
    with pytest.raises(ValueError, match=r"train.ema_decay is 0.9 there, 0.0 here"):
        train.train_and_evaluate(cfg, tmp_path / "run")


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "sentiment_jax.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_trains_then_evaluates_from_checkpoints(tmp_path_factory, tmp_path):
    files = write_dataset(tmp_path_factory.mktemp("cli_data"))  # its own: relabelled below
    common = [f"--workdir={tmp_path}", "--config=configs/lstm.py", "--config.data.name=csv",
              f"--config.data.train_file={files['train']}", f"--config.data.test_file={files['test']}",
              "--config.data.max_length=16", "--config.model.hidden_sizes=8,", "--config.model.embed_dim=8",
              "--config.train.epochs=1", "--config.train.batch_size=32", "--noplots"]
    trained = run_cli(*common)
    assert trained.returncode == 0, trained.stderr[-2000:]
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["model"]["hidden_sizes"] == [8] and resolved["data"]["name"] == "csv"
    result = json.loads((tmp_path / "result.json").read_text())
    # --config in eval mode may ask for temperature scaling; the model stays the run's own.
    evaluated = run_cli(f"--workdir={tmp_path}", "--mode=eval", "--checkpoint=latest", "--config=configs/lstm.py",
                        "--config.eval.calibrate=True")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((tmp_path / "eval_test_latest.json").read_text())
    assert report["accuracy"] == result["accuracy"] and report["temperature_scaling"]["temperature"] > 0
    assert "macro-F1" in evaluated.stdout and "confusion" in evaluated.stdout

    # A resume with a changed field fails in one line naming it, and writes nothing.
    before = snapshot(tmp_path)
    changed = run_cli(*[a for a in common if "hidden_sizes" not in a], "--config.model.hidden_sizes=16,",
                      "--config.train.weight_decay=0.5")
    assert changed.returncode == 2
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1, changed.stderr
    assert "model.hidden_sizes is [8] there, [16] here" in lines[0] and "train.weight_decay is" in lines[0]
    assert "delete" not in lines[0]
    assert snapshot(tmp_path) == before
    again = run_cli(f"--workdir={tmp_path}", "--mode=eval", "--checkpoint=latest")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "eval_test_latest.json").read_text())["accuracy"] == result["accuracy"]

    # A corrupt checkpoint is one line too, with no library output after it.
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "model" in f.parts:
            f.write_bytes(b"garbage")
    for args in (["--mode=eval", "--checkpoint=latest"], common[1:]):  # eval, and a resume from it
        broken = run_cli(f"--workdir={tmp_path}", *args)
        assert broken.returncode == 2
        lines = broken.stderr.strip().splitlines()
        assert len(lines) == 1 and "unreadable" in lines[0] and "delete" not in lines[0], broken.stderr

    # So is a resume on data with other classes, and (with a resumable field changed) it writes nothing.
    before = snapshot(tmp_path)
    for split in ("train", "test"):
        files[split].write_text(files[split].read_text().replace(",pos\n", ",positive\n"))
    relabelled = run_cli(*common, "--config.train.epochs=2")
    assert relabelled.returncode == 2
    lines = relabelled.stderr.strip().splitlines()
    assert len(lines) == 1 and "classes ['neg', 'pos'], this data has ['neg', 'positive']" in lines[0], lines
    assert snapshot(tmp_path) == before


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("args,message", [
    (["--config.model.hiden=3"], "unknown config field 'hiden'"),
    (["--config.model.name=lstmm"], "unknown model.name 'lstmm'; choose one of"),
    (["--config.data.name=csv"], "csv dataset needs --config.data.train_file"),
    (["--config.train.class_weights=balance"], "unknown train.class_weights 'balance'; choose one of"),
    (["--config.data.name=nusax_senti", "--config.data.train_languages=english,klingon"],
     "unknown NusaX language 'klingon'; choose one of"),
    (["--config.train.ema_decay=1.0"], "train.ema_decay must be in [0, 1)"),
])
def test_cli_config_mistakes_are_one_line_errors(tmp_path, args, message):
    out = run_cli(f"--workdir={tmp_path}", "--config=configs/lstm.py", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_balanced_class_weights_by_hand():
    cfg = config_base.base_config()
    assert losses.class_weights(cfg, np.array([0, 1]), 2) is None
    cfg.train.class_weights = "balanced"
    # 6 labels, 3 classes with 3 / 1 / 2 examples: n / (K n_c) = 6/9, 6/3, 6/6.
    np.testing.assert_allclose(losses.class_weights(cfg, np.array([0, 0, 0, 1, 2, 2]), 3), [2 / 3, 2, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="no training examples"):
        losses.class_weights(cfg, np.array([0, 0]), 3)


def saved_states(workdir):
    """Every checkpoint on disk as {step: (model item, train item)} in host memory."""
    run = runs.load(workdir, "latest")
    train_state, _ = state.create_state(run.cfg, run.mesh, run.encoder.vocab_size, len(run.label_names),
                                        total_steps=1)
    with checkpoints.reader(workdir, run.cfg.checkpoint) as mngr:
        return {step: jax.device_get(checkpoints.restore(
            mngr, step, model=checkpoints.abstract(state.model_item(train_state)),
            train=checkpoints.abstract(state.train_item(train_state)))) for step in mngr.all_steps()}


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_checkpoints_stay_finite(files, reference_run,
                                                                                          tmp_path):
    """The trained reference run continued for a fifth epoch with a learning rate that overflows the parameters.
    Its sums read every step name the first non-finite step; read only at saves and at the epoch's end (every
    4 steps), long after it, they name the same one. With the rate fixed, the run resumes from its last finite
    checkpoint and still classifies as well."""
    import shutil

    more = {"mesh.num_devices": 1, "train.epochs": 5, "checkpoint.every_steps": 4}
    messages = {}
    for log_every in (1, 20):
        shutil.copytree(reference_run[0], tmp_path / f"every_{log_every}")
        bad = tiny_config(files, **more, **{"train.learning_rate": 1e30, "train.log_every": log_every})
        with pytest.raises(train.TrainingDiverged) as e:
            train.train_and_evaluate(bad, tmp_path / f"every_{log_every}")
        messages[log_every] = str(e.value)
    step = int(messages[1].split("NaN/inf at step ")[1].split(";")[0])
    assert step > 32 and step % 4 and "\n" not in messages[1], messages[1]  # not itself a step that reads the sums
    assert messages[20] == messages[1]
    states = saved_states(tmp_path / "every_20")
    assert max(states) < step and f"latest step {max(states)}" in messages[20]
    for saved in states.values():
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved)), sorted(states)
    result = train.train_and_evaluate(tiny_config(files, **more), tmp_path / "every_20")
    assert np.isfinite(result["loss"]) and result["accuracy"] > 0.8, result


def test_cli_divergence_is_one_line_after_the_progress_output(files, tmp_path):
    out = run_cli(f"--workdir={tmp_path}", "--config=configs/lstm.py", "--config.data.name=csv",
                  f"--config.data.train_file={files['train']}", f"--config.data.test_file={files['test']}",
                  "--config.data.max_length=16", "--config.model.hidden_sizes=8,", "--config.model.embed_dim=8",
                  "--config.train.batch_size=32", "--config.train.learning_rate=1e30", "--config.train.log_every=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: the loss or parameters became NaN/inf at step "), last
