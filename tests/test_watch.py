"""What a training run lets one watch: TensorBoard events, the figures it ends with, optional W&B logging."""

import importlib.util
import io
import json
import math
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from conftest import REPO, TINY_RUNS, tiny_flags

# 160 training texts in batches of 16: 10 steps an epoch, 3 epochs, every step logged.
RUN = {**TINY_RUNS["gru"], "flags": {**TINY_RUNS["gru"]["flags"], "train.log_every": 1}}
STEPS_PER_EPOCH, EPOCHS, PEAK_LR = 10, 3, 0.01


def run_main(args, env=None):
    return subprocess.run([sys.executable, "-m", "sentiment_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny GRU run through the command line, as `make train` runs the main job."""
    tmp = tmp_path_factory.mktemp("watch")
    workdir = tmp / "run"
    done = run_main([*tiny_flags(tmp, RUN), f"--workdir={workdir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def read_events(folder: pathlib.Path) -> list:
    """Every event of the TFRecord files in `folder`: [u64 length][u32 crc][data][u32 crc] per record."""
    events = []
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def values(events, tag):
    return [(e.step, v) for e in events for v in e.summary.value if v.tag == tag]


def test_tensorboard_holds_learning_rate_step_loss_hparams_and_confusion_images(trained):
    workdir, _ = trained
    events = read_events(workdir / "tensorboard")
    total = STEPS_PER_EPOCH * EPOCHS

    # The rate used by each step, by hand: linear warmup from 0 over 1 step (5% of 30), then cosine to 0.
    def by_hand(step):  # optax counts updates from 0: step s used the schedule at s - 1
        s = step - 1
        return PEAK_LR * s if s < 1 else PEAK_LR * 0.5 * (1 + math.cos(math.pi * (s - 1) / (total - 1)))

    lr = values(events, "train/learning_rate")
    assert [s for s, _ in lr] == list(range(1, total + 1))
    np.testing.assert_allclose([v.simple_value for _, v in lr], [by_hand(s) for s, _ in lr], rtol=1e-5, atol=1e-9)

    # Per-step losses of full, equal batches average to the epoch's train loss written to metrics.jsonl.
    step_loss = dict((s, v.simple_value) for s, v in values(events, "train/step_loss"))
    epochs = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l]
    for e in epochs:
        steps = range(e["step"] - STEPS_PER_EPOCH + 1, e["step"] + 1)
        assert np.mean([step_loss[s] for s in steps]) == pytest.approx(e["train/loss"], rel=1e-4)

    start = [v for e in events for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
    assert len(start) == 1
    hp = plugin_hparams_pb2.HParamsPluginData.FromString(start[0].metadata.plugin_data.content)
    hparams = hp.session_start_info.hparams
    assert hparams["train.learning_rate"].number_value == PEAK_LR
    assert hparams["model.name"].string_value == "gru"
    assert hparams["train.epochs"].number_value == EPOCHS

    val_images = values(events, "val/confusion_matrix")
    assert [s for s, _ in val_images] == [STEPS_PER_EPOCH * (i + 1) for i in range(EPOCHS)]
    (test_step, test_image), = values(events, "test/confusion_matrix")
    assert test_step == total
    image = Image.open(io.BytesIO(test_image.image.encoded_image_string))
    assert image.size == (test_image.image.width, test_image.image.height) and min(image.size) > 100
    assert len(set(np.asarray(image.convert("L")).ravel().tolist())) > 10  # drawn, not blank


def test_the_tensorboard_viewer_reads_the_logs(trained):
    """The `tensorboard` extra's own loader (what its web page reads) sees the scalars, images and hparams."""
    pytest.importorskip("tensorboard", reason="the viewer is the `tensorboard` extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = trained
    loaded = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = loaded.Tags()
    assert {"train/learning_rate", "train/step_loss", "val/accuracy"} <= set(tags["scalars"])
    assert {"val/confusion_matrix", "test/confusion_matrix"} <= set(tags["images"])
    assert len(loaded.Scalars("train/step_loss")) == STEPS_PER_EPOCH * EPOCHS
    assert "_hparams_/session_start_info" in loaded.PluginTagToContent("hparams")


def test_training_ends_with_curves_and_confusion_pngs(trained):
    workdir, done = trained
    line, = [l for l in done.stdout.splitlines() if l.startswith("figures: ")]
    listed = [pathlib.Path(p) for p in line[len("figures: "):].split(", ")]
    assert sorted(p.name for p in listed) == ["confusion.png", "curves.png", "f1.png"]
    for path in listed:
        assert path.parent == workdir
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    with Image.open(workdir / "curves.png") as curves:  # three panels side by side: wider than tall
        assert curves.size[0] > 2.5 * curves.size[1]


def test_wandb_is_not_imported_by_default():
    code = ("import pathlib, sys, tempfile; from sentiment_jax import metrics, train; "
            "w = metrics.MetricWriter(pathlib.Path(tempfile.mkdtemp())); w.write(1, {'a': 1.0}); w.close(); "
            "print('wandb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_project_without_wandb_is_one_line(tmp_path):
    out = run_main([*tiny_flags(tmp_path, RUN), "--config.train.wandb_project=demo", f"--workdir={tmp_path / 'r'}"])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "pip install 'sentiment_jax[wandb]'" in lines[0]


def read_wandb_history(path: pathlib.Path) -> list[dict]:
    """The logged rows of an offline W&B run file: a 7-byte header, then LevelDB-log records in 32 KiB
    blocks, each piece [u32 crc][u16 length][u8 type: 1 full, 2 first, 3 middle, 4 last][data]."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pieces, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (extra: wandb)")
def test_wandb_offline_run_logs_the_scalars(tmp_path):
    workdir = tmp_path / "run"
    flags = tiny_flags(tmp_path, {**RUN, "flags": {**RUN["flags"], "train.epochs": 1}})
    done = run_main([*flags, "--config.train.wandb_project=sentiment_jax_test", "--noplots",
                     f"--workdir={workdir}"], env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    run_file, = (workdir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = read_wandb_history(run_file)
    jsonl = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["train/step_loss"] for r in jsonl if "train/step_loss" in r}
    assert {r["_step"]: r["train/step_loss"] for r in rows if "train/step_loss" in r} == pytest.approx(logged)
    result = json.loads((workdir / "result.json").read_text())
    assert [r["test/accuracy"] for r in rows if "test/accuracy" in r] == [pytest.approx(result["accuracy"])]
    images = [r["val/confusion_matrix/path"] for r in rows if r.get("val/confusion_matrix/_type") == "image-file"]
    assert len(images) == 1
    with Image.open(run_file.parent / "files" / images[0]) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_tokenizing_a_large_split_shows_a_bar_on_stderr_and_encodes_as_one_call(capsys):
    import ml_collections

    from sentiment_jax import data as data_lib
    from sentiment_jax import input_pipeline, tokenization

    rng = np.random.default_rng(0)
    words = ["good", "bad", "plot", "film", "the", "zzz"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(input_pipeline.PROGRESS_FROM + 1)]
    split = data_lib.Split(texts, np.zeros(len(texts), np.int32))
    tokenizer = tokenization.WordTokenizer.fit(texts[:50], vocab_size=5)
    cfg = ml_collections.ConfigDict({"max_length": 6, "padding": "pre", "truncation": "pre"})

    encoded = input_pipeline.encode(split, tokenizer, cfg, desc="tokenize train")
    assert "tokenize train" in capsys.readouterr().err
    ids, lengths = tokenization.pad(tokenizer.encode(texts), 6, "pre", "pre")
    np.testing.assert_array_equal(encoded.ids, ids)
    np.testing.assert_array_equal(encoded.lengths, lengths)

    input_pipeline.encode(data_lib.Split(texts[:100], split.labels[:100]), tokenizer, cfg, desc="tokenize test")
    assert capsys.readouterr().err == ""


def test_training_and_validation_passes_show_progress_bars(trained):
    _, done = trained
    for bar in [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)] + ["validation: "]:
        assert bar in done.stderr, bar
