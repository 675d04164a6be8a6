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
