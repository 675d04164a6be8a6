"""fastText-style model: n-gram features, a NumPy forward, padding invariance, a tiny 3-class training."""

import jax
import numpy as np
import pytest
from flax import nnx

from sentiment_jax import data as data_lib
from sentiment_jax import config_base, runs, tokenization, train
from sentiment_jax.models import bag
from helpers import fake_run, padded, tiny_config
from test_multiclass import write_split

forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
TOKENS = [[3, 4, 5, 6, 7], [9], [2, 8, 11, 12, 13, 14, 15, 3]]


def make_model(**kw):
    return bag.BagOfEmbeddings(vocab_size=20, num_outputs=3, embed_dim=6, head_sizes=(5,), rngs=nnx.Rngs(0), **kw)


def numpy_forward(model, ids):
    p = lambda param: np.asarray(param[...], np.float64)
    x = p(model.embed.embedding)[ids].mean(0)
    for dense in model.head:
        x = np.maximum(x @ p(dense.kernel) + p(dense.bias), 0)
    return x @ p(model.out.kernel) + p(model.out.bias)


def test_matches_numpy_and_padding_never_changes_the_prediction():
    model = make_model()
    want = np.stack([numpy_forward(model, np.asarray(t)) for t in TOKENS])
    for side in ("pre", "post"):
        for width in (8, 13):
            got = forward(model, *padded(TOKENS, width, side, junk=17))
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, err_msg=f"{side} {width}")


def test_feature_dropout_is_active_only_in_training():
    model = make_model(embed_dropout=0.5)
    ids, mask = padded(TOKENS, 8, "pre", junk=0)
    a, b = (model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(s))) for s in (0, 1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model(ids, mask), model(ids, mask))


def test_ngram_features_and_round_trip(tmp_path):
    tok = tokenization.NgramTokenizer(["good", "film"], char_ngrams=(3, 4), word_ngrams=2, buckets=50)
    assert tok.vocab_size == 2 + 2 + 50
    h = tok._hash
    grams = lambda w: [h(g) for g in (f"<{w}>"[i:i + n] for n in (3, 4) for i in range(len(w) + 3 - n))]
    # "goodish" is unknown: only its character n-grams, some shared with "good".
    want = [2] + grams("good") + grams("goodish") + [h("good goodish")] + [3] + grams("film") + [h("goodish film")]
    assert tok.encode(["Good goodish FILM"])[0].tolist() == want
    assert set(grams("good")) & set(grams("goodish"))
    pieces = tok.pieces("good goodish film")  # what interpret.py shows next to each id
    assert [i for _, i in pieces] == want and [p for p, _ in pieces[:3]] == ["good", "<go", "goo"]
    assert pieces[-1][0] == "goodish film"
    assert all(4 <= i < tok.vocab_size for i in want if i > 3)
    runs.save_encoder(tok, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()  # not Hugging Face's file name: not its format
    again = runs.load_encoder(tmp_path, None)
    assert again.encode(["good goodish film", "x"])[0].tolist() == want
    assert again.vocab_size == tok.vocab_size


def test_three_class_training_with_ngram_features(tmp_path):
    files = {"train": write_split(tmp_path / "train.csv", 240, 0), "test": write_split(tmp_path / "test.csv", 90, 1)}
    cfg = tiny_config(files, **{"model.name": "fasttext", "model.embed_dim": 16, "data.tokenizer.kind": "ngrams",
                                "data.tokenizer.buckets": 500, "data.max_length": 256, "train.epochs": 6,
                                "checkpoint.best_metric": "macro_f1"})
    result = train.train_and_evaluate(cfg, tmp_path / "run")
    assert result["macro_f1"] > 0.9


def test_saliency_names_every_ngram_feature():
    from sentiment_jax import config_base, interpret, models

    cfg = config_base.base_config()
    cfg.model.update({"name": "fasttext", "embed_dim": 8})
    tok = tokenization.NgramTokenizer(["superb", "film"], char_ngrams=(3, 4), buckets=40)
    model = models.build_model(cfg.model, tok.vocab_size, 2, nnx.Rngs(params=0))
    explanation = interpret.explain(fake_run(cfg, tok, model), "superb film")
    assert explanation["words"] == [piece for piece, _ in tok.pieces("superb film")]
    assert len(explanation["saliency"]) == len(explanation["words"])


def numpy_pool(model, ids, weights, norm, sublinear):
    """TF-IDF-style pooling by hand: one feature vector v over distinct ids, then E^T v / |v|."""
    ids = np.asarray(ids)
    uniq, tf = np.unique(ids, return_counts=True)
    v = (1 + np.log(tf) if sublinear else tf) * (weights[uniq] if weights is not None else 1.0)
    z = np.abs(v).sum() if norm == "l1" else np.sqrt((v ** 2).sum())
    return v @ np.asarray(model.embed.embedding[...], np.float64)[uniq] / z


def test_inverse_document_frequency_by_hand():
    texts = [np.array([2, 3, 3]), np.array([3, 4]), np.array([3])]
    idf = tokenization.inverse_document_frequency(texts, 6)
    # n = 3 texts; df(2) = 1, df(3) = 3, df(4) = 1; ids 0, 1, 5 occur in no text.
    want = [0, 0, np.log(4 / 2) + 1, np.log(4 / 4) + 1, np.log(4 / 2) + 1, 0]
    np.testing.assert_allclose(idf, want, rtol=1e-6)


@pytest.mark.parametrize("weighting,norm,sublinear", [("idf", "l1", False), ("idf", "l2", False),
                                                      ("uniform", "l2", True), ("idf", "l2", True)])
def test_weighted_pooling_matches_numpy_and_ignores_padding(weighting, norm, sublinear):
    weights = np.linspace(0.5, 2.0, 20).astype(np.float32)
    weights[7] = 0.0  # a feature unseen in training adds nothing
    model = bag.BagOfEmbeddings(vocab_size=20, num_outputs=3, embed_dim=6, weights=weighting, norm=norm,
                                sublinear_tf=sublinear, feature_weights=weights if weighting == "idf" else None,
                                rngs=nnx.Rngs(0))
    tokens = TOKENS + [[4, 4, 4, 7, 9, 4], [5, 5]]  # repeated ids: tf > 1
    p = lambda param: np.asarray(param[...], np.float64)
    want = np.stack([numpy_pool(model, t, weights if weighting == "idf" else None, norm, sublinear)
                     for t in tokens]) @ p(model.out.kernel) + p(model.out.bias)
    for side in ("pre", "post"):
        got = forward(model, *padded(tokens, 11, side, junk=4))  # junk equal to a real id must not count
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, err_msg=side)


def test_feature_weights_of_the_wrong_shape_fail_clearly():
    with pytest.raises(ValueError, match="shape"):
        make_model(weights="idf", feature_weights=np.ones(3))


def train_and_restore(tmp_path, **overrides):
    """A 3-class n-gram run trained to macro-F1 > 0.9, restored from its checkpoint, and the fixed feature
    weights its training split should have given it (a restored model is built with ones)."""
    from sentiment_jax import input_pipeline

    files = {"train": write_split(tmp_path / "train.csv", 240, 0), "test": write_split(tmp_path / "test.csv", 90, 1)}
    cfg = tiny_config(files, **{"data.tokenizer.kind": "ngrams", "data.tokenizer.buckets": 500,
                                "data.max_length": 256, "checkpoint.best_metric": "macro_f1", **overrides})
    assert train.train_and_evaluate(cfg, tmp_path / "run")["macro_f1"] > 0.9
    restored = runs.load(tmp_path / "run")
    split = input_pipeline.encode(data_lib.load_dataset(cfg.data).splits["train"], restored.encoder, cfg.data)
    texts = [row[len(row) - n:] for row, n in zip(split.ids, split.lengths)]  # pre-padded
    vocab = restored.encoder.vocab_size
    if cfg.model.name == "fasttext":
        return files, restored, tokenization.inverse_document_frequency(texts, vocab)
    return files, restored, tokenization.log_count_ratios(texts, split.labels, vocab, 3)


def test_idf_training_with_class_weights_saves_the_idf_in_the_checkpoint(tmp_path):
    _, restored, want = train_and_restore(
        tmp_path, **{"model.name": "fasttext", "model.embed_dim": 16, "train.epochs": 6, "model.bag_weights": "idf",
                     "model.bag_norm": "l2", "model.sublinear_tf": True, "train.class_weights": "balanced"})
    assert want.max() > 1.5 and (want == 0).any()
    np.testing.assert_array_equal(np.asarray(restored.model.feature_weights[...]), want)


def test_log_count_ratios_by_hand():
    texts = [np.array([2, 3, 3]), np.array([3, 4]), np.array([4])]
    r = tokenization.log_count_ratios(texts, [0, 1, 1], 6, 2, alpha=1.0)
    # Presence counts per class: id 2 (1, 0), id 3 (1, 1), id 4 (0, 2); ids 0, 1, 5 occur in no text.
    # Class 0: p = 1 + (0, 0, 1, 1, 0, 0), q = 1 + (0, 0, 0, 1, 2, 0); |p| = 8, |q| = 9.
    p0, q0 = np.array([1, 1, 2, 2, 1, 1]) / 8, np.array([1, 1, 1, 2, 3, 1]) / 9
    want0 = np.where([0, 0, 1, 1, 1, 0], np.log(p0 / q0), 0)
    np.testing.assert_allclose(r[:, 0], want0, rtol=1e-6)
    np.testing.assert_allclose(r[:, 1], np.where([0, 0, 1, 1, 1, 0], np.log(q0 / p0), 0), rtol=1e-6)


def test_nb_linear_matches_numpy_and_ignores_padding_and_repeats():
    rng = np.random.default_rng(0)
    ratios = rng.normal(size=(20, 3)).astype(np.float32)
    model = bag.NBLinear(vocab_size=20, num_outputs=3, rngs=nnx.Rngs(0))
    model.feature_weights[...] = ratios
    model.kernel[...] = rng.normal(size=(20, 3)).astype(np.float32)
    model.bias[...] = np.array([0.1, -0.2, 0.3], np.float32)
    tokens = TOKENS + [[4, 4, 4, 7, 9, 4], [5, 5]]
    w = np.asarray(model.kernel[...], np.float64) * ratios
    want = np.stack([w[sorted(set(t))].sum(0) for t in tokens]) + [0.1, -0.2, 0.3]  # each distinct feature once
    for side in ("pre", "post"):
        got = forward(model, *padded(tokens, 11, side, junk=4))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, err_msg=side)


def test_nb_linear_trains_and_restores_its_ratios(tmp_path):
    files, restored, want = train_and_restore(
        tmp_path, **{"model.name": "nb_linear", "train.epochs": 3, "train.learning_rate": 0.05})
    assert want.shape == (restored.encoder.vocab_size, 3) and np.abs(want).max() > 1
    np.testing.assert_array_equal(np.asarray(restored.model.feature_weights[...]), want)
    # Saliency (gradient x input) of a linear model is exact: each feature's share of the target's log-probability.
    from sentiment_jax import interpret

    text = "w1 " + open(files["test"]).read().splitlines()[1].split(",")[1]  # a repeated word too
    explanation = interpret.explain(restored, text)
    ids = np.asarray(restored.encoder.encode([text])[0])
    scores = np.asarray(restored.model.feature_weights[...])[ids] * np.asarray(restored.model.kernel[...])[ids]
    tf = np.array([np.sum(ids == i) for i in ids])
    p, k = explanation["probabilities"], explanation["predicted"]
    np.testing.assert_allclose(explanation["saliency"], (scores[:, k] - scores @ p) / tf, atol=1e-5)


def test_refit_trains_on_validation_too_and_tests_the_last_epoch(tmp_path):
    """data.train_on_validation: tokenizer, NB ratios and training see train + validation; no validation
    figures; test reads the last checkpoint. The ratios are checked against a direct NumPy count."""
    import csv

    files = {s: write_split(tmp_path / f"{s}.csv", n, seed) for s, n, seed in
             (("train", 240, 0), ("validation", 60, 2), ("test", 90, 1))}
    rows = open(files["validation"]).read().splitlines()
    open(files["validation"], "w").write("\n".join(rows + [f"999,valonly {rows[1].split(',')[1]},negative"]) + "\n")
    cfg = tiny_config(files, **{"data.validation_file": files["validation"], "data.tokenizer.kind": "ngrams",
                                "data.tokenizer.buckets": 500, "data.max_length": 256, "model.name": "nb_linear",
                                "train.epochs": 3, "train.learning_rate": 0.05, "data.train_on_validation": True})
    result = train.train_and_evaluate(cfg, tmp_path / "run")
    epochs = runs.read_metrics(tmp_path / "run", "epoch")
    assert len(epochs) == 3 and not any(k.startswith("val/") for e in epochs for k in e)
    assert result["checkpoint"] == "latest" and result["checkpoint_step"] == 3 * -(-301 // 16)  # 301 texts, batch 16
    assert result["macro_f1"] > 0.9
    restored = runs.load(tmp_path / "run")
    assert "valonly" in restored.encoder.words  # a word seen only in validation is in the vocabulary

    # NB log-count ratios by direct counting over the train and validation CSVs: p = 1 + texts of the class
    # containing the id, q = 1 + other texts containing it, r = ln(p / sum p) - ln(q / sum q), 0 for unseen ids.
    texts, labels = [], []
    for split in ("train", "validation"):
        for row in csv.DictReader(open(files[split])):
            texts.append(row["text"])
            labels.append(["negative", "neutral", "positive"].index(row["label"]))
    vocab = restored.encoder.vocab_size
    presence = np.zeros((len(texts), vocab))
    for i, ids in enumerate(restored.encoder.encode(texts)):
        presence[i, ids] = 1
    onehot = np.eye(3)[labels]
    in_class = presence.T @ onehot
    other = presence.sum(0)[:, None] - in_class
    p, q = 1 + in_class, 1 + other
    want = np.where(presence.sum(0)[:, None] > 0, np.log(p / p.sum(0)) - np.log(q / q.sum(0)), 0)
    np.testing.assert_allclose(np.asarray(restored.model.feature_weights[...]), want, rtol=1e-5, atol=1e-6)
    train_only = presence[:240].T @ onehot[:240]
    assert not np.allclose(in_class, train_only)  # validation's counts are in, so the check above can tell

    import ml_collections

    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)  # as a hand-edited config.json could be
    cfg.data.train_on_validation = "yes"
    with pytest.raises(ValueError, match="data.train_on_validation must be True or False"):
        config_base.check_config(cfg)
