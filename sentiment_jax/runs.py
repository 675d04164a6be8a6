"""Reading a run back from its workdir: per-epoch metrics, the test result, the trained model.

Sweeps, plots, interpretability and the NumPy reference all start from a finished run's
folder, so they share these few readers instead of each parsing the files its own way.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_collections
from flax import nnx

from sentiment_jax import checkpoints, metrics, sharding, tokenization, train


def read_metrics(workdir: str | pathlib.Path, kind: str | None = None) -> list[dict]:
    """The records of `metrics.jsonl`, optionally only those of one kind ('epoch', 'params', 'test')."""
    file = pathlib.Path(workdir) / "metrics.jsonl"
    if not file.is_file():
        return []
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def read_result(workdir: str | pathlib.Path) -> dict | None:
    """The test report the run wrote when it finished, or None if it has not finished."""
    file = pathlib.Path(workdir) / "result.json"
    return json.loads(file.read_text()) if file.is_file() else None


def read_predictions(workdir: str | pathlib.Path) -> dict | None:
    """The per-example test predictions behind result.json (metrics.load_predictions), or None for a run
    that has not finished or was trained before they were saved."""
    result = read_result(workdir)
    if result is None:
        return None
    file = pathlib.Path(workdir) / f"predictions_{result['split']}_{result['checkpoint']}.npz"
    return metrics.load_predictions(file) if file.is_file() else None


def label_names(workdir: str | pathlib.Path) -> list[str]:
    """Class names in logit order: `labels.json`, else (runs older than it) the finished run's result."""
    workdir = pathlib.Path(workdir)
    if (workdir / train.LABELS_FILE).is_file():
        return list(train.load_labels(workdir))
    result = read_result(workdir)
    if result is None:
        raise FileNotFoundError(f"{workdir / train.LABELS_FILE} not found; is {workdir} a trained run?")
    return list(result["per_class"])


@dataclasses.dataclass
class Restored:
    cfg: ml_collections.ConfigDict
    tokenizer: object
    model: nnx.Module  # parameters of one checkpoint, ready to call
    label_names: list[str]
    step: int
    state: train.TrainState  # the same parameters as arrays, for jitted use
    setup: train.Setup


def restore(workdir: str | pathlib.Path, which: str | int = "best") -> Restored:
    """The model of a finished run, from its config, tokenizer and one checkpoint (params only)."""
    workdir = pathlib.Path(workdir)
    cfg = train.load_config(workdir)
    tokenizer = tokenization.load(workdir)
    names = label_names(workdir)
    state, setup = train.create_state(cfg, sharding.make_mesh(cfg.mesh), tokenizer.vocab_size, len(names),
                                      total_steps=1)
    mngr = checkpoints.manager(workdir, cfg.checkpoint, read_only=True)
    step = checkpoints.resolve_step(mngr, which)
    item = checkpoints.restore(mngr, step, model=checkpoints.abstract(train.model_item(state)))["model"]
    mngr.close()
    state = state.replace(params=item["params"], rest=item["rest"])
    model = nnx.merge(setup.graphdef, item["params"], item["rest"])
    return Restored(cfg, tokenizer, model, names, int(step), state, setup)
