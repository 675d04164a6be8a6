"""`--mode=predict`: texts from arguments, files or stdin -> one JSON line per text."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from sentiment_jax import exported, predict
from sentiment_jax.data import DataError

from conftest import REPO, child_env

TEXTS = ["great good film", "awful, boring plot", "it was fine"]


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "sentiment_jax.main", "--mode=predict", *args], cwd=REPO,
                          env=child_env(), input=stdin, capture_output=True, text=True, timeout=120)


def test_cli_predicts_texts_given_as_arguments(trained_runs, predictors):
    done = cli(f"--workdir={trained_runs['gru']}", *TEXTS)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    expected = predictors["gru"].predict(TEXTS)
    assert [r["model"] for r in records] == ["gru"] * 3
    got = [[r["probabilities"][n] for n in ("negative", "neutral", "positive")] for r in records]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cli_reports_bad_input_in_one_line(tmp_path, trained_runs):
    (tmp_path / "texts.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    done = cli(f"--workdir={trained_runs['lstm']}", f"--input={tmp_path / 'texts.jsonl'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'texts.jsonl'}:2: no text in field 'text'; " \
                                                   "set --text_field to the right column/key"


@pytest.mark.parametrize("name, content, field", [
    ("texts.txt", "great good film\n\nawful, boring plot\r\nit was fine", "text"),
    ("texts.csv", 'id,review\n1,great good film\n2,"awful, boring plot"\n3,it was fine\n', "review"),
    ("texts.jsonl", "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)), "text"),
])
def test_read_texts_from_files(tmp_path, name, content, field):
    (tmp_path / name).write_text(content)
    assert list(predict.read_texts(str(tmp_path / name), field)) == TEXTS


def test_read_texts_from_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TEXTS) + "\n\n"))
    assert list(predict.read_texts("-")) == TEXTS


@pytest.mark.parametrize("name, content, error", [
    ("missing.txt", None, "file not found"),
    ("a.csv", "review\ngood\n", "a.csv:2: no text in field 'text'"),
    ("a.csv", "text\ngood\n\"\"\n", "a.csv:3: no text in field 'text'"),
    ("a.jsonl", '{"text": "good"}\n{"text": ', "a.jsonl:2: not valid JSON"),
    ("a.jsonl", '["good"]\n', "a.jsonl:1: expected a JSON object per line"),
    ("a.jsonl", '{"text": 3}\n', "a.jsonl:1: no text in field 'text'"),
    ("a.txt", b"good\n\xff\xfe\n", "not valid UTF-8"),
])
def test_read_texts_errors_name_the_place(tmp_path, name, content, error):
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    elif content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=error):
        list(predict.read_texts(str(tmp_path / name)))


def test_predict_streams_chunks_in_order(monkeypatch, trained_runs, predictors):
    monkeypatch.setattr(predict, "CHUNK", 2)
    monkeypatch.setattr(exported, "load_predictor", lambda workdir, checkpoint: predictors["lstm"])
    out = io.StringIO()
    texts = TEXTS + ["bad", "superb"]
    assert predict.predict(trained_runs["lstm"], iter(texts), out=out) == 5
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    expected = predictors["lstm"].predict(texts)
    np.testing.assert_allclose([[r["probabilities"]["neg"], r["probabilities"]["pos"]] for r in records],
                               expected, atol=1e-6)
