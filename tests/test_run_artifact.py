"""A trained run is one artifact: every model kind, restored by runs.load, gives the same probabilities
through eval, predict, a served request, an ensemble and interpret, and a mistake never corrupts it.

To check another way of using a run (e.g. an exported forward pass), add a function to PATHS:
(workdir, texts) -> probabilities [N, K]; `test_every_path_gives_the_same_probabilities` runs it on
every kind.
"""

import io
import json
import shutil

import numpy as np
import pytest

from helpers import tiny_config
from sentiment_jax import (data, ensemble, export, exported, files, inference, interpret, metrics, predict, runs, serve,
                           train)
from sentiment_jax.models import encoders
from test_verbalizer import TEMPLATE, _tiny_bert

FILLER = "the movie film plot was it and a very not".split()  # all in the tiny BERT's vocabulary
CUES = (["bad", "awful"], ["good", "great"])
BACKBONE = {"data.inputs": "backbone_features", "model.name": "feature_mlp", "backbone.template": TEMPLATE,
            "backbone.batch_size": 8, "backbone.bucket_width": 8, "backbone.layers": (0, -1)}
KINDS = {
    "lstm": {"model.name": "lstm", "train.loss": "sigmoid"},
    "gru": {"model.name": "gru", "train.ema_decay": 0.9},
    "rnn": {"model.name": "rnn", "model.bidirectional": False},
    "transformer": {"model.name": "transformer", "model.num_layers": 1, "model.num_heads": 2, "model.mlp_dim": 16},
    "fasttext": {"model.name": "fasttext", "data.tokenizer.kind": "ngrams", "data.tokenizer.buckets": 50,
                 "model.bag_weights": "idf"},
    "nb_linear": {"model.name": "nb_linear", "data.tokenizer.kind": "ngrams", "data.tokenizer.buckets": 50},
    "verbalizer": {**BACKBONE, "model.head_sizes": (8,), "backbone.pooling": "layers_mean", "backbone.windows": 2},
    "label_words": {**BACKBONE, "model.head_sizes": (), "backbone.pooling": "label_words",
                    "backbone.label_words": ("bad", "good"), "backbone.template": TEMPLATE + " {mask}"},
}
ODD = ["x", "good " * 30, "awful plot and not very good at all"]  # unknown words, beyond max_length, mixed


def write_split(path, n, seed):
    rng = np.random.default_rng(seed)
    rows = ["text,label"]
    for i in range(n):
        words = list(rng.choice(FILLER, rng.integers(2, 14)))
        words.insert(rng.integers(0, len(words)), rng.choice(CUES[i % 2]))
        rows.append(f"{' '.join(words)},{['neg', 'pos'][i % 2]}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run per kind on the same data; kind -> (workdir, end-of-training result)."""
    root = tmp_path_factory.mktemp("kinds")
    files = {"train": write_split(root / "train.csv", 64, 0), "test": write_split(root / "test.csv", 24, 1)}
    bert = _tiny_bert(root / "bert")
    out = {}
    for kind, fields in KINDS.items():
        cfg = tiny_config(files, **{"mesh.num_devices": 1, "train.epochs": 1, "backbone.path": str(bert),
                                    "backbone.cache_dir": str(root / "features"), **fields})
        out[kind] = root / kind, train.train_and_evaluate(cfg, root / kind)
    return out


@pytest.fixture(scope="module")
def predictors(trained):
    return {kind: inference.load(workdir, name=kind, batch_sizes=(8,)) for kind, (workdir, _) in trained.items()}


@pytest.fixture(scope="module")
def test_texts(trained):
    workdir = next(iter(trained.values()))[0]
    return list(data.load_dataset(runs.load_config(workdir).data).splits["test"].texts)


def predicted(workdir, texts):
    out = io.StringIO()
    predict.predict(workdir, texts, out=out)
    return np.array([list(json.loads(line)["probabilities"].values()) for line in out.getvalue().splitlines()])


def served(workdir, texts):
    from fastapi.testclient import TestClient

    app = serve.create_app({"m": inference.load(workdir, batch_sizes=(1, 4))}, ["key"])
    with TestClient(app) as client:
        response = client.post("/v1/predict", json={"texts": list(texts)}, headers={serve.KEY_HEADER: "key"})
    assert response.status_code == 200, response.text
    return np.array([list(p["probabilities"].values()) for p in response.json()["predictions"]])


def interpreted(workdir, texts):
    """One text at a time, as the command does (each compiles anew, so only the last two texts)."""
    run, probs = runs.load(workdir), np.full((len(texts), 2), np.nan)
    for i in (len(texts) - 2, len(texts) - 1):
        probs[i] = interpret.explain(run, texts[i])["probabilities"]
    return probs


def exported_path(workdir, texts):
    folder = export.export_run(workdir, workdir.parent / f"{workdir.name}_export")
    return exported.load(folder, batch_sizes=(4,)).predict(texts)


PATHS = {
    "export": exported_path,
    "predict": predicted,
    "serve": served,
    "interpret": interpreted,
    "runs.load": lambda workdir, texts: runs.load(workdir).predict(texts),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_path_gives_the_same_probabilities(trained, predictors, test_texts, kind):
    workdir, result = trained[kind]
    texts = test_texts[:5] + ODD
    reference = predictors[kind].predict(texts)
    assert reference.shape == (len(texts), 2) and np.allclose(reference.sum(1), 1, atol=1e-6)
    for name, path in PATHS.items():
        probs = path(workdir, texts)
        done = ~np.isnan(probs[:, 0])  # a path may check only some of the texts
        assert done.sum() >= 2, name
        np.testing.assert_allclose(probs[done], reference[done], atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_only_reports_what_training_and_prediction_do(trained, predictors, test_texts, kind):
    """Eval-only restores the run as the end-of-training report did, and the per-example probabilities it
    saves are the other paths' own."""
    workdir, result = trained[kind]
    report = train.evaluate(workdir, split="test")
    assert (report["accuracy"], report["confusion_matrix"], report["loss"]) == (
        result["accuracy"], result["confusion_matrix"], result["loss"])
    saved = metrics.load_predictions(runs.predictions_file(workdir, "test", "best"))
    np.testing.assert_allclose(saved["probabilities"], predictors[kind].predict(test_texts), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(saved["labels"], data.load_dataset(runs.load_config(workdir).data)
                                  .splits["test"].labels)


@pytest.mark.parametrize("kind", ["transformer", "verbalizer"])
def test_no_request_compiles_after_warmup(predictors, kind):
    p = predictors[kind]
    p.warmup()
    encoder = p.run.encoder
    compiled = lambda: (p._predict_step._cache_size(),
                        encoder.extractor().features._cache_size() if kind == "verbalizer" else 0)
    before = compiled()
    assert p.predict(ODD + ["good"] * 9).shape == (12, 2)
    assert compiled() == before


def test_an_ensemble_averages_its_members_predictions(trained, predictors, test_texts):
    workdirs = [workdir for workdir, _ in trained.values()]
    probs, labels, names, members = ensemble.mean_probabilities(workdirs, "test")
    expected = np.mean([p.predict(test_texts) for p in predictors.values()], axis=0)
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)
    assert names == ("neg", "pos") and len(labels) == len(test_texts)
    assert [m["accuracy"] for m in members] == [result["accuracy"] for _, result in trained.values()]


def test_a_verbalizer_run_encodes_new_texts_as_its_training_features(trained, test_texts):
    """The cached test features (extracted in training) and the encoder's fresh extraction of the same texts."""
    for kind in ("verbalizer", "label_words"):
        run = runs.load(trained[kind][0])
        cached = run.encoder.encode_splits(data.load_dataset(run.cfg.data))["test"].ids
        np.testing.assert_allclose(np.stack(run.encoder.encode(test_texts)), cached, atol=1e-5)
        spec = json.loads((run.workdir / runs.ENCODER_FILE).read_text())
        assert (spec["pooling"], spec["windows"], spec["template"]) == (
            run.cfg.backbone.pooling, run.cfg.backbone.windows, run.cfg.backbone.template)
        assert spec["backbone"]["fingerprint"] == run.encoder.backbone.fingerprint


def test_a_missing_backbone_is_a_one_line_error_naming_its_folder(trained, tmp_path):
    workdir = trained["verbalizer"][0]
    moved = tmp_path / "bert"
    shutil.copytree(runs.load_config(workdir).backbone.path, moved)
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    for name in (runs.CONFIG_FILE, runs.ENCODER_FILE):  # as if trained on the copy
        text = (run / name).read_text().replace(runs.load_config(workdir).backbone.path, str(moved))
        (run / name).write_text(text)
    assert runs.load(run).step == runs.load(workdir).step
    shutil.rmtree(moved)
    with pytest.raises(encoders.BackboneError, match=f"backbone folder {moved} .* is missing") as info:
        runs.load(run)
    assert "\n" not in str(info.value)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    file = tmp_path / "curves.png"
    file.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with files.atomic_path(file) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert [(f.name, f.read_bytes()) for f in tmp_path.iterdir()] == [("curves.png", b"old")]
