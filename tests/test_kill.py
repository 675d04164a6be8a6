"""Real kills: a training process SIGKILLed inside steps and during asynchronous saves resumes each time and
ends exactly where an uninterrupted run does; a half-written checkpoint is never restored."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, TINY_RUNS, child_env, tiny_flags

# Runs the command line; with $HOLD_SAVE=<step>, that step's save (on orbax's background thread) touches
# $HOLD_MARK just before it would be renamed into place, then waits, so the test can kill mid-save.
LAUNCHER = """
import asyncio, os, pathlib
from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def held(self, *args, **kwargs):
    if self._final_path.name == os.environ.get("HOLD_SAVE"):
        pathlib.Path(os.environ["HOLD_MARK"]).touch()
        await asyncio.sleep(600)
    return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = held
from absl import app
from sentiment_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""

# 160 training texts in batches of 16: 10 steps an epoch, 30 in all; saves every 3 steps and at epoch ends.
RUN = {**TINY_RUNS["lstm"], "flags": {**TINY_RUNS["lstm"]["flags"], "checkpoint.async_save": True,
                                      "checkpoint.every_steps": 3, "train.log_every": 1}}
STEPS = 30


def start(workdir: pathlib.Path, data_dir: pathlib.Path, hold: int | None = None):
    """One training process, its output in <workdir>.<n>.log for the n-th start; shares compiled code via the
    test run's compilation cache (conftest.child_env)."""
    env = {**child_env(), "HOLD_SAVE": str(hold or ""), "HOLD_MARK": str(held_mark(workdir))}
    log = open(workdir.parent / f"{workdir.name}.{len(list(workdir.parent.glob(f'{workdir.name}.*.log')))}.log", "w")
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, f"--workdir={workdir}", "--noplots",
                             *tiny_flags(data_dir, RUN)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def held_mark(workdir: pathlib.Path) -> pathlib.Path:
    return workdir.parent / f"{workdir.name}.held"


def resumed_from(workdir: pathlib.Path, n: int) -> int | None:
    """The checkpoint step the n-th start of a run resumed from, None if it started afresh."""
    log = (workdir.parent / f"{workdir.name}.{n}.log").read_text()
    steps = [int(l.split()[-1]) for l in log.splitlines() if l.startswith("resuming from checkpoint step")]
    return steps[0] if steps else None


def wait_for(proc, condition, what: str, timeout: float = 180):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def logged_steps(workdir: pathlib.Path, skip: int = 0) -> list[int]:
    """Steps of the running-loss records, after the first `skip` lines of metrics.jsonl."""
    file = workdir / "metrics.jsonl"
    lines = file.read_text().splitlines()[skip:] if file.is_file() else []
    return [json.loads(l)["step"] for l in lines if l.endswith("}") and "train/running_loss" in l]


def lines(workdir: pathlib.Path) -> int:
    file = workdir / "metrics.jsonl"
    return len(file.read_text().splitlines()) if file.is_file() else 0


def tensorboard_steps(workdir: pathlib.Path) -> list[int]:
    """The steps of train/step_loss as the TensorBoard viewer shows them (it hides what a restart purges)."""
    pytest.importorskip("tensorboard", reason="the viewer is the `tensorboard` extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [e.step for e in events.Scalars("train/step_loss")]


def half_written(workdir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def final_state(workdir: pathlib.Path):
    from sentiment_jax import runs

    restored = runs.load(workdir, "latest")
    epochs = runs.read_metrics(workdir, "epoch")
    kept = [{k: v for k, v in e.items() if k.startswith(("train/loss", "train/acc", "val/"))} for e in epochs]
    return restored.step, restored.params, kept, runs.read_result(workdir)


def test_sigkilled_training_resumes_to_the_same_end_as_an_uninterrupted_run(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    reference = start(tmp_path / "reference", data_dir)
    workdir = tmp_path / "killed"
    kills = []

    def kill(proc, where):
        assert proc.poll() is None, f"the run ended before the kill {where}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(where)

    # 1. Inside a step early in epoch 1 (just after step 1 is logged).
    proc = start(workdir, data_dir)
    wait_for(proc, lambda: logged_steps(workdir), "step 1")
    kill(proc, "in a step of epoch 1")
    # 2. During the asynchronous mid-epoch save of step 6: its folder is left half-written.
    proc = start(workdir, data_dir, hold=6)
    wait_for(proc, held_mark(workdir).is_file, "the save of step 6")
    kill(proc, "during the async save of step 6")
    assert [n.split(".")[0] for n in half_written(workdir)] == ["6"]
    held_mark(workdir).unlink()
    # 3. During the asynchronous save at the end of epoch 2 (the one with validation metrics).
    proc = start(workdir, data_dir, hold=20)
    wait_for(proc, held_mark(workdir).is_file, "the save of step 20")
    assert [n.split(".")[0] for n in half_written(workdir)] == ["20"]  # step 6's leftover was removed
    assert resumed_from(workdir, 2) == 3  # the step before the cut save
    kill(proc, "during the async save of step 20 (epoch end)")
    # 4. Inside a step of epoch 3, after the resumed run has gone past its checkpoint.
    seen = lines(workdir)
    proc = start(workdir, data_dir)
    wait_for(proc, lambda: any(s >= 23 for s in logged_steps(workdir, seen)), "step 23")
    assert resumed_from(workdir, 3) == 18
    kill(proc, "in a step of epoch 3")
    proc = start(workdir, data_dir)
    assert proc.wait(timeout=300) == 0, (workdir.parent / "killed.4.log").read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.0.log").read_text()[-3000:]
    assert resumed_from(workdir, 0) is None and resumed_from(workdir, 1) in (None, 3)  # a first save may be done
    assert 20 <= resumed_from(workdir, 4) < STEPS and not half_written(workdir)  # a save may have been in flight
    assert logged_steps(workdir) == list(range(1, STEPS + 1))  # each logged step once, however often it ran
    assert tensorboard_steps(workdir) == list(range(1, STEPS + 1))  # and so in TensorBoard
    step, params, metrics, result = final_state(workdir)
    ref_step, ref_params, ref_metrics, ref_result = final_state(tmp_path / "reference")
    assert step == ref_step == STEPS
    leaves, ref_leaves = (jax.tree_util.tree_leaves_with_path(p) for p in (params, ref_params))
    assert [path for path, _ in leaves] == [path for path, _ in ref_leaves] and leaves
    for (path, a), (_, b) in zip(leaves, ref_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert metrics == ref_metrics and len(metrics) == 3 and all(len(e) == 5 for e in metrics)  # every epoch
    assert result["confusion_matrix"] == ref_result["confusion_matrix"]
    assert result["accuracy"] == ref_result["accuracy"] and result["loss"] == ref_result["loss"]
    print(f"survived {len(kills)} kills: {kills}")


def test_a_half_written_checkpoint_is_never_restored_and_is_removed(tmp_path):
    """A copy of a finished step, renamed as orbax names an unfinished one and missing its arrays."""
    from sentiment_jax import checkpoints, config_base

    cfg = config_base.base_config().checkpoint
    cfg.keep_latest = 5
    mngr = checkpoints.manager(tmp_path, cfg)
    mngr.save(1, args=ocp.args.Composite(meta=ocp.args.JsonSave({"epoch": 1})))
    mngr.wait_until_finished()
    mngr.close()
    root = tmp_path / "checkpoints"
    partial = root / "2.orbax-checkpoint-tmp-1733000000"
    shutil.copytree(root / "1", partial)
    for f in partial.rglob("*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA":
            f.unlink()
    reader = checkpoints.manager(tmp_path, cfg, read_only=True)  # eval and serving: not a step, left alone
    assert reader.all_steps() == [1] and checkpoints.resolve_step(reader, "latest") == 1
    reader.close()
    writer = checkpoints.manager(tmp_path, cfg)  # training: removed by the time it saves
    assert writer.all_steps() == [1]
    writer.save(2, args=ocp.args.Composite(meta=ocp.args.JsonSave({"epoch": 2})))
    writer.wait_until_finished()
    assert sorted(p.name for p in root.iterdir()) == ["1", "2"]
    writer.close()
