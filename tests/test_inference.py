"""Inference from a workdir: agrees with the run's own test report, fixed buckets, no recompiles."""

import csv
import json

import numpy as np
import pytest

from sentiment_jax import inference

from conftest import TINY_RUNS


def test_length_buckets():
    assert inference.length_buckets(400) == (32, 64, 128, 256, 400)
    assert inference.length_buckets(64) == (32, 64)
    assert inference.length_buckets(20) == (20,)


@pytest.mark.parametrize("name", TINY_RUNS)
def test_accuracy_matches_the_training_report(predictors, trained_runs, name):
    """The same checkpoint, tokenizer and masks as eval: the test accuracy in result.json."""
    with open(trained_runs[name].parent / f"{name}_data" / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    p = predictors[name]
    predicted = [r["label"] for r in p.records(p.predict([row["text"] for row in rows]))]
    accuracy = np.mean([label == row["label"] for label, row in zip(predicted, rows)])
    assert accuracy == pytest.approx(json.loads((trained_runs[name] / "result.json").read_text())["accuracy"])


@pytest.mark.parametrize("name", TINY_RUNS)
def test_records_name_every_class(predictors, name):
    p = predictors[name]
    assert p.label_names == tuple(TINY_RUNS[name]["labels"])
    (record,) = p.records(p.predict(["great good film"]))
    assert list(record["probabilities"]) == list(p.label_names)
    assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert record["label"] == max(record["probabilities"], key=record["probabilities"].get)


def test_no_recompilation_after_warmup(predictors):
    p = predictors["lstm"]
    p.warmup()
    compiled = p._predict_step._cache_size()  # shared by every load of this run's graph and layout
    assert compiled >= len(p.batch_sizes) * len(p.lengths)
    long = " ".join(["good"] * 500)  # beyond max_length: truncated into the last bucket
    for texts in (["a"], ["!!!"], [long], ["bad film"] * 5, [long, "ok"] * 40):
        assert p.predict(texts).shape == (len(texts), 2)
    assert p._predict_step._cache_size() == compiled


def test_a_text_gets_the_same_probabilities_alone_or_in_a_batch(predictors):
    p = predictors["gru"]
    texts = ["great movie", "awful plot and boring " * 5, "fine", "the film was okay but bad " * 9, "x"]
    together = p.predict(texts)
    alone = np.concatenate([p.predict([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-6)
