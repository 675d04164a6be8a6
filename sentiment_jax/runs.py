"""The one owner of a run's folder: everything in a workdir is written and read here.

    config.json     the resolved config; read back merged onto `base_config()`, so a field
                    added later takes its default here and nowhere else
    labels.json     the class names, in logit order
    encoder.json    the input encoder: a word or n-gram vocabulary, a Hugging Face tokenizer
                    (its `tokenizers` file is `tokenizer.json` beside it), or the verbalizer's
                    frozen-backbone featurizer (template, pooling, layers, windows, and where
                    the backbone came from, with its fingerprint)
    checkpoints/    Orbax steps (see checkpoints.py), latest and best by validation
    metrics.jsonl, tensorboard/, result.json, eval_<split>_<checkpoint>.json

Files are written atomically (a temporary file, then a rename). Everything that uses a
trained run (eval, predict, serving, ensembles, interpretation, export) starts from:

    run = runs.load(workdir, checkpoint="best")   # -> Run; parameters only, no optimizer
    run.cfg, run.label_names, run.step            # the resolved config, class names, step
    ids, mask = run.inputs(texts)                 # [N, run.max_length] each, padded as in training
    probs = run.forward(run.params, run.rest, ids, mask)   # pure; jit or export it
    probs = run.predict(texts)                    # the same, jitted with the run's shardings
    run.model                                     # the module itself, for interpretation

`run.encoder.encode(texts)` gives the unpadded model inputs per text: token ids, or one
float32 feature vector for a verbalizer run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from sentiment_jax import checkpoints, config_base, input_pipeline, metrics, sharding, state, steps, tokenization
from sentiment_jax.files import write_atomic

CONFIG_FILE, LABELS_FILE, ENCODER_FILE = "config.json", "labels.json", "encoder.json"
METRICS_FILE, RESULT_FILE = "metrics.jsonl", "result.json"

# Fields a resumed run may change: they alter neither the model, nor the data, nor the batch order.
# The learning rate and clipping are among them: they are how a diverged run is fixed and resumed.
RESUMABLE = ("train.epochs", "train.log_every", "train.eval_batch_size", "checkpoint.", "mesh.", "eval.",
             "data.path", "data.download", "backbone.cache_dir", "backbone.batch_size", "model.lstm_backend",
             "model.unroll", "train.learning_rate", "train.grad_clip", "train.wandb_project")


# ---------------------------------------------------------------------------------------
# Config and labels.


def save_config(cfg, workdir: pathlib.Path) -> None:
    write_atomic(workdir / CONFIG_FILE, cfg.to_json_best_effort(indent=2, sort_keys=True))


def _merge(base: ml_collections.ConfigDict, saved: dict) -> None:
    """Saved values onto the base config; JSON lists become tuples where the field is a tuple."""
    def tuples(x):
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    for key, value in saved.items():
        if key not in base:  # a field since removed
            continue
        if isinstance(base[key], ml_collections.ConfigDict):
            _merge(base[key], value)
        else:
            base[key] = tuples(value) if isinstance(value, list) else value


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The run's config: its saved fields over the defaults of `base_config()`."""
    file = pathlib.Path(workdir) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; pass --config or a workdir written by a training run")
    cfg = config_base.base_config()
    _merge(cfg, json.loads(file.read_text()))
    return cfg


def save_labels(label_names: Sequence[str], workdir: pathlib.Path) -> None:
    write_atomic(workdir / LABELS_FILE, json.dumps(list(label_names)))


def load_labels(workdir: str | pathlib.Path) -> tuple[str, ...]:
    """Class names in logit order: `labels.json`, else (runs older than it) the finished run's result."""
    workdir = pathlib.Path(workdir)
    if (workdir / LABELS_FILE).is_file():
        return tuple(json.loads((workdir / LABELS_FILE).read_text()))
    result = read_result(workdir)
    if result is None:
        raise FileNotFoundError(f"{workdir / LABELS_FILE} not found; is {workdir} a trained run?")
    return tuple(result["per_class"])


def _flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(json.loads(cfg.to_json_best_effort()), "")
    return out


def config_differences(saved, requested) -> list[tuple[str, Any, Any]]:
    """(field, saved value, requested value) for each field that a resume may not change."""
    a, b = _flat(saved), _flat(requested)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUMABLE)]


def has_checkpoints(workdir: pathlib.Path) -> bool:
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_resume(workdir: pathlib.Path, cfg) -> None:
    """A resume must train what the checkpoints hold: fails, writing nothing, naming every differing field."""
    differences = config_differences(load_config(workdir), cfg)
    if differences:
        listed = "; ".join(f"{k} is {json.dumps(s)} there, {json.dumps(r)} here" for k, s, r in differences)
        raise ValueError(f"{workdir} holds a run with other settings ({listed}); resume with the saved values, "
                         "e.g. drop those overrides, or train into a new workdir")


# ---------------------------------------------------------------------------------------
# The input encoder.


def create_encoder(cfg, train_texts: Sequence[str]):
    """A new run's input encoder: a tokenizer fitted on the training texts, or the backbone featurizer."""
    if cfg.data.inputs == "backbone_features":
        from sentiment_jax import verbalizer

        return verbalizer.FeatureEncoder.create(cfg)
    return tokenization.build(cfg.data.tokenizer, train_texts)


def save_encoder(encoder, workdir: pathlib.Path) -> None:
    if encoder.kind == "huggingface":
        write_atomic(workdir / tokenization.HF_FILE, encoder.to_str())
    write_atomic(workdir / ENCODER_FILE, json.dumps(encoder.spec()))


def load_encoder(workdir: pathlib.Path, cfg):
    """The encoder a run saved (runs older than `encoder.json` kept its spec in `tokenizer.json`)."""
    file = workdir / ENCODER_FILE
    if not file.is_file():
        legacy = workdir / tokenization.HF_FILE
        spec = json.loads(legacy.read_text()) if legacy.is_file() else {}
        if "kind" not in spec:
            raise FileNotFoundError(f"{file} not found; is {workdir} a sentiment_jax workdir?")
    else:
        spec = json.loads(file.read_text())
    if spec["kind"] == "backbone_features":
        from sentiment_jax import verbalizer

        return verbalizer.FeatureEncoder.from_spec(spec, cfg)
    return tokenization.from_spec(spec, workdir)


# ---------------------------------------------------------------------------------------
# A trained run.


@dataclasses.dataclass
class Run:
    """One checkpoint of a trained run, restored for inference."""

    workdir: pathlib.Path
    cfg: ml_collections.ConfigDict
    label_names: tuple[str, ...]
    encoder: Any  # encode(texts) -> list of per-text inputs; vocab_size = the model's input size
    step: int
    graphdef: Any
    params: nnx.State
    rest: nnx.State
    param_sharding: Any
    rest_sharding: Any
    mesh: jax.sharding.Mesh

    @property
    def max_length(self) -> int:
        """The input width: data.max_length tokens, or the feature width of a verbalizer run."""
        fixed = self.encoder.kind == "backbone_features"
        return self.encoder.vocab_size if fixed else self.cfg.data.max_length

    @property
    def batch_sharding(self):
        return sharding.batch_sharding(self.mesh, self.cfg.mesh)

    @property
    def data_shards(self) -> int:
        """Devices the batch is split over: every batch size must be a multiple."""
        return int(np.prod([self.mesh.shape[a] for a in self.cfg.mesh.data_axes]))

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.rest)

    @functools.cached_property
    def forward(self):
        """Pure (params, rest, ids, mask) -> probabilities [B, K]."""
        return steps.forward_fn(self.graphdef, self.mesh, self.cfg.mesh)

    @functools.cached_property
    def predict_step(self):
        """`forward` jitted with the run's shardings."""
        return steps.make_predict_step(self.graphdef, self.mesh, self.cfg.mesh, self.param_sharding,
                                       self.rest_sharding, self.batch_sharding)

    def pad(self, inputs: Sequence[np.ndarray], length: int | None = None,
            rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-text inputs -> (ids, mask) [rows, length], truncated, padded and masked exactly as in training.
        Rows beyond the texts (up to `rows`) are all padding."""
        d = self.cfg.data
        return input_pipeline.pad_batch(inputs, length or self.max_length, rows or max(len(inputs), 1),
                                        padding=d.padding, truncation=d.truncation)

    def inputs(self, texts: Sequence[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.encoder.encode(texts), length)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities [N, K] of the texts, in one batch (inference.Predictor buckets many)."""
        rows = -(-max(len(texts), 1) // self.data_shards) * self.data_shards
        ids, mask = self.pad(self.encoder.encode(texts), rows=rows)
        arrays = sharding.put_batch({"ids": ids, "mask": mask}, self.batch_sharding)
        return np.asarray(self.predict_step(self.params, self.rest, arrays["ids"], arrays["mask"]))[:len(texts)]


def portable(run: Run) -> Run:
    """The run with its model on the scan (model.lstm_backend), which every platform has, in place of a
    platform's custom calls (cuDNN's, the CPU kernel's): the same function, and what an export holds."""
    if run.cfg.model.lstm_backend == "scan":
        return run
    cfg = run.cfg.copy_and_resolve_references()
    cfg.model.lstm_backend = "scan"
    graphdef = state.model_shapes(cfg, run.mesh, run.encoder.vocab_size, len(run.label_names)).graphdef
    return dataclasses.replace(run, cfg=cfg, graphdef=graphdef)


def load(workdir: str | pathlib.Path, checkpoint: str | int = "best", *, mesh_config=None) -> Run:
    """One checkpoint ('best', 'latest' or a step) of the run in `workdir`, restored onto this process's
    devices (or onto the mesh of `mesh_config`, e.g. another device count) without building an optimizer."""
    workdir = pathlib.Path(workdir)
    if not has_checkpoints(workdir):
        raise checkpoints.CheckpointError(f"no checkpoints in {workdir}; train first or fix the workdir")
    cfg = load_config(workdir)
    if mesh_config is not None:
        cfg.mesh = mesh_config
    names = load_labels(workdir)
    encoder = load_encoder(workdir, cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    shapes = state.model_shapes(cfg, mesh, encoder.vocab_size, len(names))
    with checkpoints.reader(workdir, cfg.checkpoint) as mngr:
        step = checkpoints.resolve_step(mngr, checkpoint)
        item = checkpoints.restore(mngr, step, model=shapes.restore_target())["model"]
    return Run(workdir, cfg, names, encoder, int(step), shapes.graphdef, item["params"], item["rest"],
               shapes.param_sharding, shapes.rest_sharding, mesh)


# ---------------------------------------------------------------------------------------
# Metrics and results.


def read_metrics(workdir: str | pathlib.Path, kind: str | None = None) -> list[dict]:
    """The records of `metrics.jsonl`, optionally only those of one kind ('epoch', 'params', 'test')."""
    file = pathlib.Path(workdir) / METRICS_FILE
    if not file.is_file():
        return []
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def keep_metrics_until(workdir: pathlib.Path, step: int) -> None:
    """Drops the records logged after `step` (a resume from there logs them again)."""
    file = workdir / METRICS_FILE
    if file.is_file():
        kept = [r for r in read_metrics(workdir) if r["step"] <= step and r.get("kind") != "test"]
        write_atomic(file, "".join(json.dumps(r) + "\n" for r in kept))


def read_result(workdir: str | pathlib.Path) -> dict | None:
    """The test report the run wrote when it finished, or None if it has not finished."""
    file = pathlib.Path(workdir) / RESULT_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def read_predictions(workdir: str | pathlib.Path) -> dict | None:
    """The per-example test predictions behind result.json (metrics.load_predictions), or None for a run
    that has not finished or was trained before they were saved."""
    result = read_result(workdir)
    if result is None:
        return None
    file = predictions_file(workdir, result["split"], result["checkpoint"])
    return metrics.load_predictions(file) if file.is_file() else None


def predictions_file(workdir: str | pathlib.Path, split: str, checkpoint: str | int) -> pathlib.Path:
    """Where an eval of `split` with `checkpoint` saved its per-example predictions (metrics.test_time_additions)."""
    return pathlib.Path(workdir) / f"predictions_{split}_{checkpoint}.npz"


def eval_report_name(split: str, checkpoint: str | int) -> str:
    """The report an eval-only run of `split` with `checkpoint` writes in the workdir."""
    return f"eval_{split}_{checkpoint}.json"


def saved_predictions(workdir: str | pathlib.Path, split: str, checkpoint: str | int, step: int,
                      texts: Sequence[str]) -> dict | None:
    """The predictions an eval of `split` with `checkpoint` saved, if that eval scored checkpoint `step`
    on exactly these texts; else None (predict again)."""
    file = predictions_file(workdir, split, checkpoint)
    try:
        report = json.loads((pathlib.Path(workdir) / eval_report_name(split, checkpoint)).read_text())
    except (OSError, ValueError):
        return None
    if (report.get("checkpoint_step") != step or report.get("texts_sha256") != metrics.texts_digest(texts)
            or not file.is_file()):
        return None
    return metrics.load_predictions(file)


def write_report(workdir: pathlib.Path, name: str, report: dict) -> None:
    """`result.json` or `eval_<split>_<checkpoint>.json`."""
    write_atomic(workdir / name, json.dumps(report, indent=2))
