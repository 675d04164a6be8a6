"""K-class training end to end on a generated 3-class dataset; macro-F1 against scikit-learn's."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import f1_score

from sentiment_jax import models

REPO = pathlib.Path(__file__).resolve().parent.parent
CLASS_WORDS = {"negative": "awful", "neutral": "okay", "positive": "great"}


def write_split(path, n, seed):
    rng = np.random.default_rng(seed)
    filler = [f"w{i}" for i in range(30)]
    rows = ["id,text,label"]
    for i in range(n):
        label = list(CLASS_WORDS)[i % 3]
        words = list(rng.choice(filler, size=rng.integers(3, 12)))
        words.insert(int(rng.integers(0, len(words))), CLASS_WORDS[label])
        rows.append(f"{i},{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_three_class_training_end_to_end(tmp_path):
    # A separate process: one CPU device, the command line a user would type.
    overrides = {"data.name": "csv", "data.train_file": write_split(tmp_path / "train.csv", 240, 0),
                 "data.test_file": write_split(tmp_path / "test.csv", 90, 1), "data.validation_fraction": 0.2,
                 "data.max_length": 16, "model.embed_dim": 16, "model.hidden_sizes": "16,", "model.attention_dim": 8,
                 "train.epochs": 4, "train.batch_size": 16, "train.learning_rate": 0.01,
                 "checkpoint.best_metric": "macro_f1", "checkpoint.async_save": False,
                 "pretrain.embeddings": "none"}  # the config's word2vec start has tests of its own
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    run = subprocess.run([sys.executable, "-m", "sentiment_jax.main", "--config=configs/bilstm_attention.py",
                          f"--workdir={tmp_path / 'run'}", "--config.model.name=gru", "--noplots", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert list(result["per_class"]) == ["negative", "neutral", "positive"]
    assert result["macro_f1"] > 0.9
    # Expand the confusion matrix back into (label, prediction) pairs for scikit-learn.
    confusion = np.asarray(result["confusion_matrix"])
    labels, preds = zip(*[(i, j) for i in range(3) for j in range(3) for _ in range(confusion[i, j])])
    assert result["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert result["trainable_params"] > 0


def load_config(name, variant):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize("name,variant", [("transformer", "nusax"), ("bilstm_attention", "imdb"), ("rnn", "nusax"),
                                          ("stacked_lstm", "3-uni"), ("fasttext", "nusax")])
def test_config_files_build_models(name, variant):
    cfg = load_config(name, variant)
    model = models.build_model(cfg.model, 50, 3, nnx.Rngs(0))
    ids = np.arange(1, 9).reshape(2, 4)
    assert model(ids, ids > 1).shape == (2, 3)


def test_stacked_lstm_study_is_config_only():
    cfg = load_config("stacked_lstm", "3-bi")
    assert tuple(cfg.model.hidden_sizes) == (64, 32, 16) and cfg.model.bidirectional is True
    cfg.model.bidirectional = (True, False, False)  # per-layer direction, as from the command line
    model = models.build_model(cfg.model, 50, 2, nnx.Rngs(0))
    assert [layer.out_features for layer in model.layers] == [128, 32, 16]
    with pytest.raises(ValueError, match="stacked_lstm.py"):
        load_config("stacked_lstm", "4-bi")
    with pytest.raises(ValueError, match="choose imdb or nusax"):
        load_config("transformer", "sst2")
