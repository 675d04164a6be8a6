"""Ensembles of trained runs: the mean of the members' probabilities, scored like a single run."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from sklearn.metrics import accuracy_score, f1_score

from sentiment_jax import data, ensemble


def test_ensemble_scores_the_mean_of_its_members_probabilities(trained_runs, predictors):
    names = ("lstm", "transformer")  # two model families trained on the same generated data
    report = ensemble.ensemble([trained_runs[n] for n in names], split="test")
    test = data.load_dataset(predictors["lstm"].config.data).splits["test"]
    member_probs = [predictors[n].predict(test.texts) for n in names]
    mean = np.mean(member_probs, axis=0)
    assert np.abs(member_probs[0] - member_probs[1]).max() > 0.05  # the average is not either member
    probs, labels, _, _ = ensemble.mean_probabilities([trained_runs[n] for n in names], split="test")
    np.testing.assert_allclose(probs, mean, rtol=1e-6)
    np.testing.assert_array_equal(labels, test.labels)
    assert report["macro_f1"] == pytest.approx(f1_score(test.labels, mean.argmax(-1), average="macro"))
    assert report["accuracy"] == pytest.approx(accuracy_score(test.labels, mean.argmax(-1)))
    for member, name in zip(report["members"], names):  # each as its own training run reported it
        result = json.loads((trained_runs[name] / "result.json").read_text())
        assert member["macro_f1"] == pytest.approx(result["macro_f1"])
        assert member["checkpoint_step"] == result["checkpoint_step"]


def test_ensemble_mistakes_are_one_line_errors(trained_runs):
    with pytest.raises(ValueError, match="differ from those of"):  # 3 classes against 2
        ensemble.ensemble([trained_runs["lstm"], trained_runs["gru"]])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ensemble.ensemble([trained_runs["lstm"], trained_runs["transformer"]], split="dev")
    run = subprocess.run([sys.executable, "-m", "sentiment_jax.ensemble", f"--workdirs={trained_runs['lstm']}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip() == "error: an ensemble needs at least two workdirs, got 1"


def test_ensemble_rows_are_compared_with_the_best_on_the_same_examples(trained_runs, predictors):
    from math import comb

    names = ("lstm", "transformer")
    report = ensemble.ensemble([trained_runs[n] for n in names], split="test")
    test = data.load_dataset(predictors["lstm"].config.data).splits["test"]
    probs = {str(trained_runs[n]): predictors[n].predict(test.texts) for n in names}
    probs["ensemble"] = np.mean(list(probs.values()), axis=0)
    right = {name: p.argmax(-1) == test.labels for name, p in probs.items()}
    best = report["significance"]["best"]
    assert right[best].mean() == max(r.mean() for r in right.values())
    others = report["significance"]["others_minus_best"]
    assert sorted(others) == sorted(set(right) - {best})
    for name, s in others.items():
        only_this, only_best = int(np.sum(right[name] & ~right[best])), int(np.sum(~right[name] & right[best]))
        n = only_this + only_best
        p = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(min(only_this, only_best) + 1)) / 2 ** n)
        assert s["mcnemar_p"] == pytest.approx(p)
        assert s["accuracy"]["difference"] == pytest.approx(right[name].mean() - right[best].mean())
    json.dumps(report)  # what --output writes


def test_saved_predictions_are_reused_only_for_the_same_checkpoint_and_texts(trained_runs, tmp_path):
    import shutil

    names = ("lstm", "transformer")
    report = ensemble.ensemble([trained_runs[n] for n in names], split="test")
    assert [m["predictions"] for m in report["members"]] == ["saved", "saved"]
    copies = [shutil.copytree(trained_runs[n], tmp_path / n) for n in names]
    for copy, field, stale in zip(copies, ("texts_sha256", "checkpoint_step"), ("0" * 20, -1)):
        # The saved eval scored other texts, or another checkpoint than the one loaded now; its
        # predictions are also made wrong, so reading them would change the figures.
        eval_file = copy / "eval_test_best.json"
        eval_file.write_text(json.dumps({**json.loads(eval_file.read_text()), field: stale}))
        with np.load(copy / "predictions_test_best.npz") as z:
            np.savez(copy / "predictions_test_best.npz", **{**z, "probabilities": z["probabilities"][:, ::-1]})
    again = ensemble.ensemble(copies, split="test")
    assert [m["predictions"] for m in again["members"]] == ["computed", "computed"]
    assert again["accuracy"] == report["accuracy"] and again["macro_f1"] == report["macro_f1"]
    assert [m["accuracy"] for m in again["members"]] == [m["accuracy"] for m in report["members"]]
