"""Equal-weight ensembles of trained runs: the mean of their class probabilities on one split.

  python -m sentiment_jax.ensemble --workdirs=runs/nb_linear,runs/fasttext,runs/bilstm --split=test

Models of different families (an n-gram model, a recurrent one) make different mistakes, and the
mean of their probabilities can beat each of them. Fix the members and the weights before looking
at test: equal weights here, so there is nothing to fit. Every member must be a run on the same
dataset (same split texts, labels and class names), and each reads its own tokenizer and checkpoint.
A member whose eval of the same checkpoint saved its predictions on the same texts (every finished
run has them for test) is not predicted again.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Sequence

import numpy as np
from absl import app, flags, logging

from sentiment_jax import checkpoints, inference, metrics, runs
from sentiment_jax import data as data_lib
from sentiment_jax._extras import MissingExtra


def mean_probabilities(workdirs: Sequence[str | pathlib.Path], split: str = "test",
                       checkpoint: str | int = "best") -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[dict]]:
    """(the members' mean probabilities [N, K], labels [N], class names, each member's own figures and
    probabilities) on `split`."""
    if len(workdirs) < 2:
        raise ValueError(f"an ensemble needs at least two workdirs, got {len(workdirs)}")
    total, reference, members = None, None, []
    for workdir in workdirs:
        predictor = inference.load(workdir, checkpoint=checkpoint)
        splits = data_lib.load_dataset(predictor.config.data).splits
        if split not in splits:
            raise ValueError(f"unknown split '{split}'; choose one of {sorted(splits)}")
        texts, labels = splits[split].texts, splits[split].labels
        if reference is None:
            reference = (predictor.label_names, texts, labels, workdir)
        elif (predictor.label_names, texts) != reference[:2] or not np.array_equal(labels, reference[2]):
            raise ValueError(f"{workdir}: its {split} split or class names differ from those of {reference[3]}; "
                             "ensemble runs of the same dataset")
        # An eval of this very checkpoint on these texts saved its predictions: no need to predict again.
        saved = runs.saved_predictions(workdir, split, checkpoint, predictor.checkpoint_step, texts)
        probs = saved["probabilities"] if saved is not None else predictor.predict(texts)
        report = metrics.classification_report(labels, probs.argmax(-1), predictor.label_names)
        members.append({"workdir": str(workdir), "checkpoint_step": predictor.checkpoint_step,
                        "predictions": "saved" if saved is not None else "computed",
                        "accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "probabilities": probs})
        total = probs if total is None else total + probs
    label_names, _, labels, _ = reference
    return total / len(workdirs), labels, label_names, members


def ensemble(workdirs: Sequence[str | pathlib.Path], split: str = "test", checkpoint: str | int = "best") -> dict:
    """The ensemble's report on `split` (as `train.evaluate` writes one), with each member's own figures."""
    probs, labels, label_names, members = mean_probabilities(workdirs, split, checkpoint)
    report = metrics.classification_report(labels, probs.argmax(-1), label_names)
    rows = {m["workdir"]: {"labels": labels, "probabilities": m.pop("probabilities"), "label_names": list(label_names)}
            for m in members}
    rows["ensemble"] = {"labels": labels, "probabilities": probs, "label_names": list(label_names)}
    accuracy = {**{m["workdir"]: m["accuracy"] for m in members}, "ensemble": report["accuracy"]}
    best = max(accuracy, key=accuracy.get)
    # Which gaps between the rows are more than the luck of this split's examples.
    report.update({"split": split, "checkpoint": str(checkpoint), "members": members,
                   "significance": {"best": best, "others_minus_best": metrics.against_best(rows, best)}})
    return report


def define_flags() -> None:
    flags.DEFINE_list("workdirs", None, "Trained runs to average, comma-separated.", required=True)
    flags.DEFINE_string("split", "test", "The split to report.")
    flags.DEFINE_string("checkpoint", "best", "Each member's checkpoint: best, latest or a step number.")
    flags.DEFINE_string("output", None, "Also write the report here as JSON.")


def main(argv) -> None:
    del argv
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    try:
        report = ensemble(FLAGS.workdirs, FLAGS.split, FLAGS.checkpoint)
    except (data_lib.DataError, checkpoints.CheckpointError, MissingExtra, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for m in report["members"]:
        print(f"member {m['workdir']} (step {m['checkpoint_step']}): accuracy {m['accuracy']:.4f}  "
              f"macro-F1 {m['macro_f1']:.4f}")
    print(f"ensemble of {len(report['members'])}, {FLAGS.split}:")
    print(metrics.format_report(report, list(report["per_class"])))
    print(metrics.significance_table(report["significance"]["others_minus_best"], report["significance"]["best"]))
    if FLAGS.output:
        pathlib.Path(FLAGS.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
