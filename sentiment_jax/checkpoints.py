"""Orbax checkpoints: latest and best-by-validation, restorable onto any mesh.

Each checkpoint step holds three items, so callers restore only what they need:
`model` (parameters and other model variables; all that eval and serving read), `train`
(optimizer state, step, RNG) and `meta` (JSON: epoch, data iterator position, partial epoch sums).
Restores take an abstract target carrying the *current* shardings, so a run saved on
8 devices restores on 1 and vice versa.
"""

from __future__ import annotations

import contextlib
import pathlib

import jax
from absl import logging
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

ITEMS = ("model", "train", "meta")


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint, phrased as one line with the fix."""


def manager(workdir: pathlib.Path, cfg, *, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the `keep_latest` newest steps and the `keep_best` best by validation `best_metric`."""
    metric = cfg.best_metric
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=cfg.keep_latest),
        policies.BestN(get_metric_fn=lambda m: m[metric], n=cfg.keep_best,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, best_fn=lambda m: m[metric], best_mode="max",
        keep_checkpoints_without_metrics=True, read_only=read_only, create=not read_only,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=cfg.async_save)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(min(verbosity, logging.ERROR) if read_only else verbosity)  # "directory is read only"
    try:
        return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options, item_names=ITEMS)
    finally:
        logging.set_verbosity(verbosity)


@contextlib.contextmanager
def reader(workdir: pathlib.Path, cfg):
    """A read-only manager, closed however the block ends (an open one prints asyncio errors at exit)."""
    mngr = manager(workdir, cfg, read_only=True)
    try:
        yield mngr
    finally:
        mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, model, train, meta: dict,
         metrics: dict | None = None) -> None:
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(meta)), metrics=metrics)


def data_position(global_batch_size: int) -> dict:
    """Meta fields that make the saved iterator position (step, epoch, batch_index) global.

    Every process derives its rows from the same global batch order, so the position is
    one number for all of them; the process count is recorded to explain a changed topology.
    """
    return {"global_batch_size": global_batch_size, "process_count": jax.process_count()}


def check_data_position(meta: dict, global_batch_size: int) -> None:
    """A resume must replay the same global batches; the process count may change."""
    saved = meta.get("global_batch_size", global_batch_size)
    if saved != global_batch_size:
        raise CheckpointError(
            f"the checkpoint was trained with global batch size {saved}, this run has {global_batch_size}; "
            f"resume with --config.train.batch_size={saved} (it is global, not per process) or use a new workdir")
    count = meta.get("process_count", 1)
    if count != jax.process_count():
        logging.warning("resuming a run saved by %d processes on %d: each process takes its rows of the "
                        "same global batches, so the data order is unchanged", count, jax.process_count())


def resolve_step(mngr: ocp.CheckpointManager, which: str | int) -> int:
    """'best', 'latest' or a step number -> an existing step, else a one-line error."""
    steps = mngr.all_steps()
    where = mngr.directory
    if not steps:
        raise CheckpointError(f"no checkpoints in {where}; train first or pass the right --workdir")
    if which == "latest":
        return mngr.latest_step()
    if which == "best":
        best = mngr.best_step()
        return best if best is not None else mngr.latest_step()
    try:
        step = int(which)
    except ValueError:
        raise CheckpointError(f"--checkpoint must be 'best', 'latest' or a step number, got '{which}'") from None
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {where}; available: {sorted(steps)}")
    return step


def abstract(tree):
    """Shape/dtype/sharding stand-ins for a tree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(mngr: ocp.CheckpointManager, step: int, **targets) -> dict:
    """Restores the named items (e.g. model=abstract_model) of one step."""
    args = {name: (ocp.args.JsonRestore() if name == "meta" else ocp.args.StandardRestore(target))
            for name, target in targets.items()}
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory} is unreadable or does not match this model "
            f"({type(e).__name__}: {first[:200]}); evaluate another step with --checkpoint "
            f"(available: {sorted(mngr.all_steps())}), or train into a new workdir") from None
    return {name: restored[name] for name in targets}
