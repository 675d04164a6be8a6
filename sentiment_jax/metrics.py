"""Classification metrics from predictions (NumPy, on the host) and a JSONL/TensorBoard writer."""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Sequence

import numpy as np

from sentiment_jax import files
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


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported with torch hidden: tensorboardX imports torch when it is
    installed (seconds per process) only to accept torch tensors, which nothing here passes."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Scalars to `metrics.jsonl` and TensorBoard event files (and Weights & Biases when
    `wandb_project` names a project); a no-op on processes other than 0. `first_step` is the
    first step this process logs: TensorBoard hides what an earlier, killed attempt logged from
    there on, as metrics.jsonl drops it (runs.keep_metrics_until)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True, wandb_project: str = "",
                 config: dict | None = None, first_step: int | None = None):
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        SummaryWriter = _tensorboardx_writer()
        self._jsonl = open(workdir / "metrics.jsonl", "a")
        self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=first_step)
        if wandb_project:  # imported only when asked for: an optional extra
            wandb = require("wandb", "wandb")
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
            import wandb  # imported by __init__ already

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


# ---------------------------------------------------------------------------------------
# Calibration: how far the confidence of a prediction is from how often it is right.

ECE_BINS = 15


def probability_report(labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]) -> dict:
    """classification_report of the argmax, with the cross-entropy of the true class, ECE and Brier."""
    report = classification_report(labels, probs.argmax(-1), label_names)
    report["loss"] = negative_log_likelihood(labels, probs)
    report["ece"] = expected_calibration_error(labels, probs)
    report["brier"] = brier_score(labels, probs)
    return report


def negative_log_likelihood(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean cross-entropy of the true class; for either loss this is the training loss on the split."""
    true_probs = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(true_probs, np.finfo(np.float32).tiny))))


def calibration_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width bin (lo, hi] of the top probability: count, mean confidence, accuracy."""
    confidence = probs.max(-1)
    correct = probs.argmax(-1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    total = lambda x: np.bincount(index, weights=x, minlength=bins)
    safe = np.maximum(count, 1)
    return {"count": count, "confidence": total(confidence) / safe, "accuracy": total(correct) / safe}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N) |accuracy_b - confidence_b| over equal-width bins of the top probability."""
    b = calibration_bins(labels, probs, bins)
    return float(np.sum(b["count"] * np.abs(b["accuracy"] - b["confidence"])) / max(len(labels), 1))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean over examples of Σ_k (p_k - [k = label])²: 0 is perfect; with 2 classes twice the binary form."""
    onehot = np.eye(probs.shape[-1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same as dividing the logits by T (log p differs from them by a per-row constant)."""
    logits = np.log(np.maximum(probs.astype(np.float64), np.finfo(np.float64).tiny)) / temperature
    logits -= logits.max(-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(-1, keepdims=True)


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The T > 0 that minimises the cross-entropy of temperature_scale(probs, T) (Guo et al. 2017)."""
    from scipy import optimize

    nll = lambda log_t: negative_log_likelihood(labels, temperature_scale(probs, np.exp(log_t)))
    return float(np.exp(optimize.minimize_scalar(nll, bounds=(np.log(0.02), np.log(50.0)), method="bounded",
                                                 options={"xatol": 1e-5}).x))


def test_time_additions(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                        workdir: pathlib.Path, name: str, validation: tuple | None = None) -> dict:
    """What an eval report adds beside its figures: writes `predictions_NAME.npz` (labels and probabilities,
    for paired comparisons between runs) and `reliability_NAME.png`; with `validation` = (probs, labels)
    fits a temperature there and reports ECE, Brier and loss after it on this split."""
    workdir = pathlib.Path(workdir)
    save_predictions(workdir / f"predictions_{name}.npz", labels, probs, label_names)
    curves = {"as trained": probs}
    extra = {}
    if validation is not None:
        temperature = fit_temperature(validation[1], validation[0])
        scaled = temperature_scale(probs, temperature)
        curves[f"temperature {temperature:.2f}"] = scaled
        extra["temperature_scaling"] = {"temperature": temperature, "fitted_on": "validation",
                                        "ece": expected_calibration_error(labels, scaled),
                                        "brier": brier_score(labels, scaled),
                                        "loss": negative_log_likelihood(labels, scaled)}
    from sentiment_jax import plots

    plots.reliability_diagram({k: calibration_bins(labels, p) for k, p in curves.items()},
                              workdir / f"reliability_{name}.png")
    return extra


# ---------------------------------------------------------------------------------------
# Per-example predictions and paired significance between runs on the same test examples.


def save_predictions(file: pathlib.Path, labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]) -> None:
    with files.atomic_path(file) as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=np.asarray(labels, np.int32), probabilities=np.asarray(probs, np.float32),
                 label_names=np.asarray(list(label_names)))


def texts_digest(texts: Sequence[str]) -> str:
    """A fingerprint of a split's texts, kept in its eval report, so saved predictions are reused
    only for the very texts they were made from."""
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:20]


def load_predictions(file: pathlib.Path) -> dict:
    """{"labels" [N], "probabilities" [N, K], "label_names"} as save_predictions wrote them."""
    if not pathlib.Path(file).is_file():
        raise FileNotFoundError(f"{file} not found; evaluate the run again (--mode=eval) to write it")
    with np.load(file) as z:
        return {"labels": z["labels"], "probabilities": z["probabilities"], "label_names": list(z["label_names"])}


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs b (only A right) and c (only B right)
    are Binomial(b + c, 1/2) if the two are equally accurate."""
    from scipy import stats

    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def _macro_f1(labels: np.ndarray, predictions: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """Macro-F1 along `axis` (vectorised for the bootstrap), 2 tp / (predicted + support) per class."""
    f1 = 0.0
    for c in range(k):
        tp = np.sum((labels == c) & (predictions == c), axis=axis)
        denom = np.sum(predictions == c, axis=axis) + np.sum(labels == c, axis=axis)
        f1 = f1 + np.divide(2.0 * tp, denom, out=np.zeros(np.shape(tp)), where=denom > 0)
    return f1 / k


def paired_difference(labels: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, k: int, *,
                      resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """A minus B in accuracy and macro-F1 on the same examples, each with a percentile bootstrap interval
    that resamples examples (both models' predictions of an example together), and McNemar's exact p."""
    from scipy import stats

    correct_a, correct_b = pred_a == labels, pred_b == labels
    statistics = {
        "accuracy": lambda y, a, b, axis: np.mean(a == y, axis=axis) - np.mean(b == y, axis=axis),
        "macro_f1": lambda y, a, b, axis: _macro_f1(y, a, k, axis) - _macro_f1(y, b, k, axis),
    }
    out = {"examples": int(len(labels)), "mcnemar_p": mcnemar_exact(correct_a, correct_b), "level": level}
    for name, statistic in statistics.items():
        ci = stats.bootstrap((labels, pred_a, pred_b), statistic, paired=True, vectorized=True,
                             n_resamples=resamples, confidence_level=level, method="percentile",
                             batch=max(1, 2_000_000 // max(len(labels), 1)), rng=np.random.default_rng(seed))
        out[name] = {"difference": float(statistic(labels, pred_a, pred_b, -1)),
                     "low": float(ci.confidence_interval.low), "high": float(ci.confidence_interval.high)}
    return out


def against_best(predictions: dict[str, dict], best: str, **kwargs) -> dict[str, dict]:
    """paired_difference of every other entry minus `best`; each entry as load_predictions returns it."""
    ref = predictions[best]
    out = {}
    for name, p in predictions.items():
        if name == best:
            continue
        if not np.array_equal(p["labels"], ref["labels"]) or p["label_names"] != ref["label_names"]:
            raise ValueError(f"{name} and {best} were not tested on the same examples; compare runs of one test split")
        out[name] = paired_difference(ref["labels"], p["probabilities"].argmax(-1), ref["probabilities"].argmax(-1),
                                      len(ref["label_names"]), **kwargs)
    return out


def significance_cell(s: dict | None, metric: str = "accuracy", scale: float = 100.0) -> str:
    """'-1.20 [-2.01, -0.40]' (points, with the interval) for a Markdown table; '–' for the best row itself."""
    if s is None:
        return "–"
    d = s[metric]
    return f"{scale * d['difference']:+.2f} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}]"


def p_cell(s: dict | None) -> str:
    return "–" if s is None else f"{s['mcnemar_p']:.2g}"


SIGNIFICANCE_HEADER = "Δ acc vs best, points [95% CI] | Δ macro-F1 vs best, ×100 [95% CI] | McNemar p"


def significance_table(others: dict[str, dict], best: str) -> str:
    """A Markdown table of against_best's results, the best row first."""
    lines = [f"| row | {SIGNIFICANCE_HEADER} |", "| --- | --- | --- | --- |",
             f"| {best} (best) | – | – | – |"]
    for name, s in others.items():
        lines.append(f"| {name} | {significance_cell(s)} | {significance_cell(s, 'macro_f1')} | {p_cell(s)} |")
    return "\n".join(lines)
