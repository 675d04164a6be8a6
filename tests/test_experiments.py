"""Sweeps, figures, the NumPy reference and saliency, on one tiny sweep trained once per module."""

import csv
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import fake_run, tiny_data, write_dataset
from sentiment_jax import config_base, interpret, losses, models, numpy_reference, runs, sweep, tokenization, train

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_MODEL = {"model.embed_dim": 8, "model.hidden_sizes": (8,), "model.pooling": "mean", "train.epochs": 2,
              "mesh.num_devices": 1}


def write_sweep(folder: pathlib.Path, spec: dict) -> str:
    file = folder / "tiny_sweep.py"
    file.write_text(f"import json\n\n\ndef get_sweep():\n    return json.loads({json.dumps(json.dumps(spec))})\n")
    return str(file)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Two seeds of a tiny LSTM that train, and one variant whose data file is missing."""
    folder = tmp_path_factory.mktemp("sweep")
    files = write_dataset(folder)
    spec = {"config": "configs/lstm.py", "set": {**tiny_data(files), **TINY_MODEL},
            "variants": [{"name": "lstm"},
                         {"name": "broken", "set": {"data.train_file": str(folder / "missing.csv")}}],
            "seeds": [0, 1], "behaviour": "english"}
    spec["set"]["eval.calibrate"] = True
    spec_file = write_sweep(folder, spec)
    summary = sweep.run_sweep(spec_file, folder / "runs")
    return spec_file, folder / "runs", summary


def test_grid_expands_with_names_and_bad_fields_are_one_line():
    spec = {"config": "configs/lstm.py", "grid": {"model.hidden_sizes": [(64,), (64, 32)],
                                                  "model.bidirectional": [False, True]}, "seeds": [0, 1]}
    expanded = sweep.expand(spec)
    assert len(expanded) == 8
    assert expanded[-1].folder == "hidden_sizes=64-32_bidirectional=True/seed_1"
    assert tuple(expanded[-1].cfg.model.hidden_sizes) == (64, 32) and expanded[-1].cfg.seed == 1
    with pytest.raises(sweep.SweepError, match="unknown config field 'model.hiden' in sweep"):
        sweep.expand({**spec, "grid": {"model.hiden": [1]}})
    with pytest.raises(sweep.SweepError, match=r"train.epochs='two' in sweep .*expected a int"):
        sweep.expand({**spec, "set": {"train.epochs": "two"}})
    with pytest.raises(sweep.SweepError, match=r"unknown key\(s\) \['grids'\]"):
        sweep.expand({"config": "configs/lstm.py", "grids": {}})


def test_sweep_summarises_marks_best_and_records_failures(tiny_sweep, monkeypatch):
    spec_file, workdir, summary = tiny_sweep
    done = {r["folder"]: r for r in summary["runs"] if r["status"] == "done"}
    assert sorted(done) == ["lstm/seed_0", "lstm/seed_1"]
    for row in done.values():
        result = runs.read_result(workdir / row["folder"])
        assert row["test_accuracy"] == result["accuracy"] and row["trainable_params"] == result["trainable_params"]
        assert row["test_ece"] == result["ece"] and row["test_ece_scaled"] == result["temperature_scaling"]["ece"]
        assert row["train_seconds"] > 0 and row["examples_per_s"] > 0
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    assert len(failed) == 2 and all("missing.csv" in r["error"] for r in failed)
    lstm = next(g for g in summary["configurations"] if g["name"] == "lstm")
    accs = [done[f"lstm/seed_{s}"]["test_accuracy"] for s in (0, 1)]
    assert lstm["best"] and lstm["test_accuracy"] == pytest.approx(np.mean(accs))
    assert lstm["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    table = (workdir / "summary.md").read_text()
    assert "**lstm** (best)" in table and "0/2 (see failures)" in table and "broken/seed_0" in table
    ece = f"{lstm['test_ece']:.3f} ± {lstm['test_ece_std']:.3f} → {lstm['test_ece_scaled']:.3f}"
    assert ece in next(line for line in table.splitlines() if line.startswith("| **lstm**"))
    assert "## Behavioural tests" in table and summary["behaviour"] in table
    assert len(list(csv.DictReader((workdir / "summary.csv").open()))) == 4
    assert json.loads((workdir / "summary.json").read_text()) == summary
    for png in ("curves.png", "f1.png", "lstm/seed_0/confusion.png", "lstm/seed_1/confusion.png"):
        assert (workdir / png).stat().st_size > 5000, png
    # Run again: finished runs are skipped, only the failed ones are retried.
    trained = []
    monkeypatch.setattr(train, "train_and_evaluate", lambda cfg, folder: trained.append(folder) or 1 / 0)
    again = sweep.run_sweep(spec_file, workdir, plots=False)
    assert sorted(p.relative_to(workdir).as_posix() for p in trained) == ["broken/seed_0", "broken/seed_1"]
    assert [r["status"] for r in again["runs"]] == [r["status"] for r in summary["runs"]]
    # Changing the sweep under existing runs is reported, never silently mixed with old results.
    spec = sweep.load_python_file(spec_file, "get_sweep")
    changed = sweep.expand({**spec, "set": {**spec["set"], "train.epochs": 3}})
    sweep.run_all(changed, workdir)
    assert not trained[2:]
    assert {r["error"] for r in sweep.summarize(changed, workdir)["runs"]} == {sweep.OTHER_CONFIG}


def reference_ece(labels, probs, bins=15):
    """ECE written as a loop over bins (lo, hi] of the top probability."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        rows = [i for i, p in enumerate(probs) if lo < p.max() <= hi]
        if rows:
            accuracy = np.mean([probs[i].argmax() == labels[i] for i in rows])
            total += len(rows) * abs(accuracy - np.mean([probs[i].max() for i in rows]))
    return total / len(labels)


def test_runs_save_their_test_predictions_and_calibration(tiny_sweep):
    from sklearn.metrics import accuracy_score, f1_score

    folder = tiny_sweep[1] / "lstm/seed_0"
    result, saved = runs.read_result(folder), runs.read_predictions(folder)
    labels, probs = saved["labels"], saved["probabilities"]
    assert saved["label_names"] == ["neg", "pos"] and len(labels) == result["num_examples"]
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(-1)))
    assert result["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(-1), average="macro"))
    assert result["ece"] == pytest.approx(reference_ece(labels, probs))
    assert result["brier"] == pytest.approx(np.mean(np.sum((probs - np.eye(2)[labels]) ** 2, -1)))
    scaling = result["temperature_scaling"]  # eval.calibrate: fitted on validation, reported on test
    logits = np.log(probs.astype(np.float64)) / scaling["temperature"]
    scaled = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert scaling["ece"] == pytest.approx(reference_ece(labels, scaled))
    assert scaling["loss"] == pytest.approx(-np.mean(np.log(scaled[np.arange(len(labels)), labels])), rel=1e-5)
    assert (folder / "reliability_test_best.png").stat().st_size > 5000
    assert not list(folder.glob("*.tmp"))


def test_configurations_are_compared_with_the_best_on_the_same_examples(tiny_sweep):
    from math import comb

    workdir = tiny_sweep[1]
    groups = [{"name": "first", "folder": "lstm/seed_0", "best": True},
              {"name": "second", "folder": "lstm/seed_1", "best": False},
              {"name": "unfinished", "folder": "broken/seed_0", "best": False}]
    sweep.add_significance(groups, workdir)
    a, b = (runs.read_predictions(workdir / f"lstm/seed_{s}") for s in (0, 1))
    right_a, right_b = (p["probabilities"].argmax(-1) == p["labels"] for p in (a, b))
    only_b, only_a = int(np.sum(right_b & ~right_a)), int(np.sum(right_a & ~right_b))
    n, k = only_a + only_b, min(only_a, only_b)
    p_value = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)
    s = groups[1]["vs_best"]
    assert s["mcnemar_p"] == pytest.approx(p_value)
    accuracy = [runs.read_result(workdir / f"lstm/seed_{i}")["accuracy"] for i in (0, 1)]
    assert s["accuracy"]["difference"] == pytest.approx(accuracy[1] - accuracy[0])
    assert s["accuracy"]["low"] <= s["accuracy"]["difference"] <= s["accuracy"]["high"]
    assert "vs_best" not in groups[0] and "vs_best" not in groups[2]
    table = sweep.markdown_table(groups_with_figures(groups))
    assert "McNemar p" in table and f"{p_value:.2g} |" in table.splitlines()[3]
    assert "| negation |" in tiny_sweep[2]["behaviour"]  # the sweep's behavioural table, also in summary.md
    assert (workdir / "behaviour" / "behaviour.png").is_file() and (workdir / "lstm/seed_0/behaviour.json").is_file()


def groups_with_figures(groups):
    return [{**g, "seeds": 1, "runs": 1, "trainable_params": None, "total_params": None} for g in groups]


@pytest.mark.parametrize("model", [
    {"name": "lstm", "hidden_sizes": (6, 5), "bidirectional": True, "pooling": "mean_max", "head_sizes": (7,)},
    {"name": "gru", "hidden_sizes": (6,), "bidirectional": False, "pooling": "last", "head_sizes": ()},
    {"name": "rnn", "hidden_sizes": (5, 4), "bidirectional": (True, False), "pooling": "max", "head_sizes": ()},
    {"name": "lstm", "hidden_sizes": (5,), "bidirectional": True, "pooling": "attention", "head_sizes": ()},
])
def test_numpy_forward_equals_flax_on_a_ragged_batch(model):
    cfg = ml_collections.ConfigDict({**config_base.base_config().model.to_dict(), "embed_dim": 6, **model})
    flax_model = models.build_model(cfg, vocab_size=30, num_outputs=3, rngs=nnx.Rngs(params=3))
    rng = np.random.default_rng(0)
    state = nnx.state(flax_model, nnx.Param)  # random biases: zero ones can hide a state that reads padding
    nnx.update(flax_model, jax.tree.map_with_path(
        lambda path, a: rng.normal(size=a.shape).astype(a.dtype) if "bias" in jax.tree_util.keystr(path) else a, state))
    lengths, width = np.array([9, 1, 4, 0, 7]), 9
    positions = np.arange(width)[None]
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(flax_model, nnx.Param)))
    call = nnx.jit(lambda m, i, k: m(i, k))
    for mask in (positions >= width - lengths[:, None], positions < lengths[:, None]):  # pre, post padding
        ids = rng.integers(1, 30, mask.shape)  # words, not padding ids, under the mask's padding too
        expected = np.asarray(call(flax_model, jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_allclose(numpy_reference.forward(params, cfg, ids, mask), expected, atol=1e-5)


def test_numpy_reference_agrees_with_a_trained_checkpoint(tiny_sweep):
    report = numpy_reference.compare(tiny_sweep[1] / "lstm/seed_0", split="test")
    assert report["num_examples"] == 64 and report["agreement"] == 1.0
    assert report["max_probability_difference"] < 1e-5
    assert report["flax_accuracy"] == runs.read_result(tiny_sweep[1] / "lstm/seed_0")["accuracy"]


def word_run(model_fields: dict, words: list[str]) -> runs.Run:
    """An untrained model with a word tokenizer, standing in for a restored run."""
    cfg = config_base.base_config()
    cfg.model.update({"embed_dim": 8, **model_fields})
    tokenizer = tokenization.WordTokenizer(words)
    return fake_run(cfg, tokenizer, models.build_model(cfg.model, tokenizer.vocab_size, 2, nnx.Rngs(params=0)))


@pytest.mark.parametrize("model", [
    {"name": "lstm", "hidden_sizes": (8,), "pooling": "mean"},
    {"name": "lstm", "hidden_sizes": (8,), "pooling": "attention"},
    {"name": "transformer", "num_layers": 2, "num_heads": 2, "mlp_dim": 16, "pooling": "cls",
     "max_positions": 32},
    {"name": "transformer", "num_layers": 1, "num_heads": 2, "mlp_dim": 16, "pooling": "mean",
     "max_positions": 32},
])
def test_saliency_equals_the_gradient_through_the_embedding_table(model, tmp_path):
    text = "the plot was superb and a fine film"  # distinct words: one table row per position
    run = word_run(model, text.split())
    explanation = interpret.explain(run, text)
    assert explanation["words"] == text.split()
    # Independent route: differentiate with respect to the embedding table itself.
    words, ids = interpret.tokens(run, text)
    ids, mask = jnp.asarray(ids[None]), jnp.ones((1, len(words)), bool)
    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)

    def log_prob(p):
        logits = nnx.merge(graphdef, p, rest)(ids, mask)
        return jnp.log(losses.probabilities(logits)[0, explanation["predicted"]])

    table_grad = jax.jit(jax.grad(log_prob))(params)["embed"]["embedding"][...][ids[0]]
    table = run.model.embed.embedding[...][ids[0]]
    np.testing.assert_allclose(explanation["saliency"], np.sum(table_grad * table, -1), rtol=1e-4, atol=1e-7)
    n = len(words)
    if model["pooling"] == "attention":
        np.testing.assert_allclose(explanation["attention_pooling"],
                                   np.asarray(run.model.attention_weights(ids, mask))[0], rtol=1e-6)
        assert explanation["attention_pooling"].sum() == pytest.approx(1.0, abs=1e-5)
    if model["name"] == "transformer":
        assert [m.shape for m in explanation["attention_maps"]] == [(2, n, n)] * model["num_layers"]
        assert explanation["attention_rollout"].shape == (n,)
        if model["pooling"] == "mean":  # no CLS: rollout rows over words each sum to 1, and so does their mean
            assert explanation["attention_rollout"].sum() == pytest.approx(1.0, abs=1e-5)
        assert interpret.attention_figure(explanation, tmp_path / "maps.png").stat().st_size > 5000
    assert interpret.figure(explanation, tmp_path / "words.png").stat().st_size > 5000


def test_rollout_of_identity_attention_is_identity_and_rows_stay_normalised():
    rng = np.random.default_rng(0)
    eye = np.broadcast_to(np.eye(4), (2, 4, 4))
    np.testing.assert_allclose(interpret.rollout([eye, eye]), np.eye(4))
    maps = [rng.dirichlet(np.ones(4), size=(2, 4)) for _ in range(3)]
    np.testing.assert_allclose(interpret.rollout(maps).sum(-1), 1.0)


@pytest.mark.parametrize("module,args,message", [
    ("sentiment_jax.sweep", ["--sweep=configs/sweeps/compare.py:quick", "--set=model.hiden=3"],
     "unknown config field 'model.hiden'"),
    ("sentiment_jax.sweep", ["--sweep=configs/sweeps/nope.py"], "configs/sweeps/nope.py: no such file"),
    ("sentiment_jax.plots", [], "no_such_run/metrics.jsonl not found"),
    ("sentiment_jax.numpy_reference", [], "no checkpoints in "),
])
def test_command_line_mistakes_are_one_line(tmp_path, module, args, message):
    missing = tmp_path / "no_such_run"
    where = [str(missing)] if module.endswith("plots") else [f"--workdir={missing}"]
    out = subprocess.run([sys.executable, "-m", module, *where, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr


def test_the_comparison_notebook_runs(tiny_sweep, monkeypatch):
    """Executes notebooks/compare_models.ipynb on the tiny sweep (its finished runs are picked up)."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    spec_file, workdir, _ = tiny_sweep
    monkeypatch.setenv("SWEEP", spec_file)
    monkeypatch.setenv("SWEEP_DIR", str(workdir))
    notebook = nbformat.read(REPO / "notebooks" / "compare_models.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
    assert "**lstm** (best)" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # curves, F1, 2 confusions, words
    assert (workdir / "interpret_best.png").is_file()


def test_sweep_of_tasks_gets_an_average_row_and_no_best_mark():
    """Rows that are different tasks (languages) are not rivals: no best mark, their mean instead."""
    def row(name, seed, val, test):
        return {"name": name, "folder": f"{name}/seed_{seed}", "status": "done", "trainable_params": 10,
                "total_params": 10, "val_accuracy": val, "val_macro_f1": val, "test_accuracy": test,
                "test_macro_f1": test, "train_seconds": 1.0, "examples_per_s": 2.0}

    rows = [row("english", 0, 0.7, 0.6), row("english", 1, 0.8, 0.8), row("javanese", 0, 0.9, 0.5)]
    groups = sweep.group_rows(rows, compare=False)
    assert [g["name"] for g in groups] == ["english", "javanese", "average of 2"]
    assert not any(g["best"] for g in groups)
    assert groups[-1]["test_accuracy"] == pytest.approx((0.7 + 0.5) / 2)  # mean of the per-task means
    assert "(best)" not in sweep.markdown_table(groups)
    assert sweep.group_rows(rows)[1]["best"] and len(sweep.group_rows(rows)) == 2
    # Runs that pick checkpoints by macro-F1 are compared by it too.
    rows[2]["val_macro_f1"] = 0.5
    assert sweep.group_rows(rows, metric="macro_f1")[0]["best"]


def test_a_refit_run_has_no_validation_figures_and_is_never_the_best(tmp_path):
    """A run with data.train_on_validation logs no val/ metrics: its row has none and validation cannot pick it."""
    cfg = config_base.base_config()
    folder = tmp_path / "refit" / "seed_0"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"accuracy": 0.9, "macro_f1": 0.9}))
    epoch = {"kind": "epoch", "epoch": 1, "train/loss": 0.1, "epoch_seconds": 2.0, "train/examples_per_s": 5.0}
    (folder / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    row = sweep.run_row(sweep.Run("refit", 0, cfg), tmp_path)
    assert row["status"] == "done" and row["val_accuracy"] is None and row["test_macro_f1"] == 0.9
    other = {**row, "name": "other", "folder": "other/seed_0", "val_accuracy": 0.5, "val_macro_f1": 0.5,
             "test_accuracy": 0.1, "test_macro_f1": 0.1}
    assert [g["best"] for g in sweep.group_rows([row, other])] == [False, True]
