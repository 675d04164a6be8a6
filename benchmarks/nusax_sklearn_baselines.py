"""Classical scikit-learn baselines on NusaX-Senti, the yardstick for our from-scratch models.

  SENTIMENT_JAX_DATA=../shared/data PYTHONPATH=. python benchmarks/nusax_sklearn_baselines.py --language=indonesian
  ... --train_languages=all    # train on the pooled train splits of all 12 languages

For each feature set and classifier, C is chosen on validation macro-F1 and test macro-F1 is
reported for that C (every C is printed too). "nb" scales binary features per class by Naive
Bayes log-count ratios and fits one logistic regression per class (NBSVM-style, as nb_linear).
Needs scikit-learn (the test extra).
"""

import numpy as np
from absl import app, flags
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_union
from sklearn.svm import LinearSVC

from sentiment_jax import config_base, data

FLAGS = flags.FLAGS
flags.DEFINE_string("language", "indonesian", "NusaX language: validation and test split.")
flags.DEFINE_string("train_languages", "", "Languages whose train splits are pooled ('' = --language, or 'all').")
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)


def features(kind: str):
    if kind == "tfidf":
        return make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          TfidfVectorizer(analyzer="char", ngram_range=(2, 5), sublinear_tf=True))
    return make_union(CountVectorizer(ngram_range=(1, 3), binary=True),
                      CountVectorizer(analyzer="char_wb", ngram_range=(2, 5), binary=True))


def nb_scores(C, x_train, y, x_eval, classes):
    """One NB-scaled logistic regression per class; [N, classes] decision values."""
    scores = []
    for c in classes:
        positive = y == c
        p, q = 1 + x_train[positive].sum(0), 1 + x_train[~positive].sum(0)
        scale = sparse.diags(np.asarray(np.log(p / p.sum()) - np.log(q / q.sum())).ravel())
        model = LogisticRegression(C=C, max_iter=3000).fit(x_train @ scale, positive)
        scores.append(model.decision_function(x_eval @ scale))
    return np.stack(scores, 1)


def main(_):
    cfg = config_base.base_config().data
    cfg.name, cfg.language, cfg.train_languages = "nusax_senti", FLAGS.language, FLAGS.train_languages
    splits = data.load_dataset(cfg).splits
    train, y = splits["train"].texts, np.asarray(splits["train"].labels)
    classes = np.unique(y)
    for kind, method in [("tfidf", "svm"), ("binary", "lr"), ("binary", "nb")]:
        vec = features(kind)
        x_train = vec.fit_transform(train).astype(np.float64)
        evals = {s: vec.transform(splits[s].texts).astype(np.float64) for s in ("validation", "test")}
        results = []
        for C in C_GRID:
            if method == "nb":
                pred = {s: classes[nb_scores(C, x_train, y, x, classes).argmax(1)] for s, x in evals.items()}
            else:
                model = (LinearSVC(C=C) if method == "svm" else LogisticRegression(C=C, max_iter=3000)).fit(x_train, y)
                pred = {s: model.predict(x) for s, x in evals.items()}
            f1 = {s: 100 * f1_score(splits[s].labels, pred[s], average="macro") for s in evals}
            results.append((f1["validation"], f1["test"], C))
            print(f"{kind} {method} C={C}: val {f1['validation']:.1f} test {f1['test']:.1f}", flush=True)
        val, test, C = max(results)
        print(f"CHOSEN {kind} {method}: C={C} val {val:.1f} test {test:.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
