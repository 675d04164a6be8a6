"""Classification metrics from predictions (NumPy, on the host) and a JSONL/TensorBoard writer."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Sequence

import numpy as np

from sentiment_jax._extras import require


def classification_report(labels: np.ndarray, predictions: np.ndarray,
                          label_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    confusion[i][j] counts examples of true class i predicted as class j. A class with no
    predictions (or no examples) gets precision (or recall) 0, as scikit-learn's default.
    """
    k = len(label_names)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / max(len(labels), 1)),
        "macro_f1": float(f1.mean()),
        "num_examples": int(len(labels)),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(label_names, precision, recall, f1, support)},
        "confusion_matrix": confusion.tolist(),
    }


def format_report(report: dict, label_names: Sequence[str]) -> str:
    lines = [f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
             f"({report['num_examples']} examples)",
             f"{'class':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name in label_names:
        c = report["per_class"][name]
        lines.append(f"{name:>12} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c['support']:8d}")
    lines.append("confusion (rows = true, columns = predicted): " + json.dumps(report["confusion_matrix"]))
    return "\n".join(lines)


class MetricWriter:
    """Scalars to `metrics.jsonl` and TensorBoard event files (and Weights & Biases when
    `wandb_project` names a project); a no-op on processes other than 0."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True, wandb_project: str = "",
                 config: dict | None = None):
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._jsonl = open(workdir / "metrics.jsonl", "a")
        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if wandb_project:  # imported only when asked for: an optional extra (check_wandb)
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=workdir.name, dir=str(workdir), config=config)

    def write(self, step: int, scalars: dict, **extra) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **extra, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def hparams(self, config: dict, metric_tags: Sequence[str]) -> None:
        """The config, flattened to dotted names, as TensorBoard hparams beside the run's scalars (so the
        HPARAMS tab can compare runs by any field); `metric_tags` are the scalars it shows per run."""
        if not self.enabled:
            return
        from tensorboardX.summary import hparams

        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(config).items()}
        for summary in hparams(flat, {tag: 0.0 for tag in metric_tags}):
            self._tb.file_writer.add_summary(summary)
        self._tb.flush()

    def confusion(self, step: int, tag: str, report: dict) -> None:
        """The confusion matrix of a classification_report as an image."""
        if not self.enabled:
            return
        from tensorboardX.utils import figure_to_image

        from sentiment_jax import plots

        image = figure_to_image(plots.confusion_figure(report, f"{tag}: accuracy {report['accuracy']:.2%}, "
                                                               f"step {step}"))  # [3, H, W] uint8
        self._tb.add_image(f"{tag}/confusion_matrix", image, int(step))
        self._tb.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"{tag}/confusion_matrix": wandb.Image(image.transpose(1, 2, 0))}, step=int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_wandb(project: str) -> None:
    """Fails before any data is read when Weights & Biases logging is asked for without its extra."""
    if project:
        require("wandb", "wandb")
