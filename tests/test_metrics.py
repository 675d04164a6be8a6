"""Our metrics against scikit-learn's."""

import numpy as np
import pytest
from sklearn import metrics as skm

from sentiment_jax import metrics


@pytest.mark.parametrize("k", [2, 3, 5])
def test_report_matches_scikit_learn(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, 300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, k, 300))
    preds[preds == k - 1] = 0  # one class never predicted: precision 0, as sklearn's zero_division=0
    report = metrics.classification_report(labels, preds, [f"c{i}" for i in range(k)])
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert report["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro", zero_division=0))
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=range(k), zero_division=0)
    for i in range(k):
        c = report["per_class"][f"c{i}"]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert report["confusion_matrix"] == skm.confusion_matrix(labels, preds, labels=range(k)).tolist()


# Calibration: against values worked out by hand.
#   confidences .92 (right), .93 (wrong) share bin 14 of 15, (13/15, 14/15]; .85 (wrong) is in bin 13,
#   .62 (right) in bin 10, .97 (right) in bin 15.
#   ECE = (2 |1/2 - .925| + |0 - .85| + |1 - .62| + |1 - .97|) / 5 = 2.11 / 5
#   Brier = (2(.08²) + 2(.93²) + 2(.85²) + 2(.38²) + 2(.03²)) / 5
CALIBRATION_PROBS = np.array([[0.08, 0.92], [0.07, 0.93], [0.15, 0.85], [0.62, 0.38], [0.03, 0.97]])
CALIBRATION_LABELS = np.array([1, 0, 0, 0, 1])


def test_ece_and_brier_against_hand_computed_values():
    assert metrics.expected_calibration_error(CALIBRATION_LABELS, CALIBRATION_PROBS) == pytest.approx(2.11 / 5)
    brier = 2 * (0.08 ** 2 + 0.93 ** 2 + 0.85 ** 2 + 0.38 ** 2 + 0.03 ** 2) / 5
    assert metrics.brier_score(CALIBRATION_LABELS, CALIBRATION_PROBS) == pytest.approx(brier)
    # Three classes: (.2² + .5² + (1 - .3)²) and a perfect prediction's 0.
    three = np.array([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]])
    assert metrics.brier_score(np.array([2, 1]), three) == pytest.approx(0.78 / 2)
    # One bin of every example: ECE is |accuracy - mean confidence|.
    assert metrics.expected_calibration_error(CALIBRATION_LABELS, CALIBRATION_PROBS, bins=1) == pytest.approx(
        abs(3 / 5 - np.mean([0.92, 0.93, 0.85, 0.62, 0.97])))


def test_temperature_scaling_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (20000, 3))
    true = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in true])  # labels drawn from the true probabilities
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(-1, keepdims=True)  # three times too confident
    temperature = metrics.fit_temperature(labels, sharp)
    assert temperature == pytest.approx(3.0, rel=0.05)
    scaled = metrics.temperature_scale(sharp, temperature)
    np.testing.assert_allclose(scaled, true, atol=0.03)
    assert (scaled.argmax(-1) == sharp.argmax(-1)).all()
    assert metrics.expected_calibration_error(labels, scaled) < 0.5 * metrics.expected_calibration_error(labels, sharp)


def _pairs(both: int, only_a: int, only_b: int, neither: int):
    """Correctness of two models on the same examples, from the cells of their 2×2 table."""
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, bool)
    return a, b


def test_mcnemar_exact_p_equals_the_binomial_tail():
    from math import comb

    a, b = _pairs(50, 7, 2, 10)  # 9 discordant pairs, 7 of them for A
    tail = sum(comb(9, k) for k in range(0, 3)) / 2 ** 9  # P(X <= 2), X ~ Binomial(9, 1/2)
    assert metrics.mcnemar_exact(a, b) == pytest.approx(2 * tail)  # 92 / 512
    assert metrics.mcnemar_exact(b, a) == pytest.approx(2 * tail)
    assert metrics.mcnemar_exact(*_pairs(5, 3, 3, 1)) == pytest.approx(1.0)
    assert metrics.mcnemar_exact(*_pairs(5, 0, 0, 1)) == 1.0  # no discordant pairs: no evidence
    a, b = _pairs(0, 12, 0, 0)
    assert metrics.mcnemar_exact(a, b) == pytest.approx(2 / 2 ** 12)


def test_paired_bootstrap_interval_covers_a_known_difference():
    """Simulated runs whose expected accuracy difference is 0.80 - 0.72 = 0.08: the 95% interval holds it
    in about 95% of the simulations (binomial sd over 100 of them: 2.2 points)."""
    rng = np.random.default_rng(1)
    covered, n = 0, 300
    for _ in range(100):
        labels = rng.integers(0, 2, n)
        u = rng.random(n)
        v = np.where(rng.random(n) < 0.5, u, rng.random(n))  # the two models' errors are correlated
        pred_a = np.where(u < 0.80, labels, 1 - labels)
        pred_b = np.where(v < 0.72, labels, 1 - labels)
        d = metrics.paired_difference(labels, pred_a, pred_b, 2, resamples=400, seed=int(rng.integers(1 << 30)))
        assert d["accuracy"]["difference"] == pytest.approx(np.mean(pred_a == labels) - np.mean(pred_b == labels))
        covered += d["accuracy"]["low"] <= 0.08 <= d["accuracy"]["high"]
    assert 88 <= covered <= 100


def test_paired_difference_reports_macro_f1_as_scikit_learn_and_refuses_other_examples():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 200)
    pred_a = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, 200))
    pred_b = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
    d = metrics.paired_difference(labels, pred_a, pred_b, 3, resamples=200)
    expected = skm.f1_score(labels, pred_a, average="macro") - skm.f1_score(labels, pred_b, average="macro")
    assert d["macro_f1"]["difference"] == pytest.approx(expected)
    assert d["macro_f1"]["low"] < expected < d["macro_f1"]["high"]
    onehot = lambda p: np.eye(3)[p]
    rows = {"a": {"labels": labels, "probabilities": onehot(pred_a), "label_names": ["x", "y", "z"]},
            "b": {"labels": labels[::-1], "probabilities": onehot(pred_b), "label_names": ["x", "y", "z"]}}
    with pytest.raises(ValueError, match="not tested on the same examples"):
        metrics.against_best(rows, "a")
