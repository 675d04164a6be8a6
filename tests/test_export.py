"""Export folders: a run's predictions from JAX, NumPy and the tokenizer alone, through the CLI and the server."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from sentiment_jax import export, exported, inference, train

from conftest import REPO, TINY_RUNS, child_env, write_split

# Both length buckets of max_length 48 (32, 48), a text cut at max_length, an empty one; more than a batch.
TEXTS = ["great good film", "awful, boring plot", "", "the movie was okay and the plot was fine " * 3,
         "love love superb " * 40, "bad", "it", "hate the boring film and the awful plot", "x y z"]


@pytest.fixture(scope="module")
def folders(predictors, tmp_path_factory):
    """conftest's shared tiny runs, exported (every model kind is exported in test_run_artifact.py)."""
    root = tmp_path_factory.mktemp("exports")
    return {name: export.export(p.run, root / name) for name, p in predictors.items()}


def test_an_export_holds_the_runs_predictions_metrics_and_shapes(predictors, folders):
    run = predictors["gru"]
    loaded = exported.load(folders["gru"], batch_sizes=(3, 5))  # sizes never exported: the batch is symbolic
    np.testing.assert_allclose(loaded.predict(TEXTS), run.predict(TEXTS), atol=1e-6)
    assert (loaded.label_names, loaded.kind, loaded.checkpoint_step) == (run.label_names, "gru", run.checkpoint_step)
    assert loaded.lengths == run.lengths == (32, 48)
    manifest = json.loads((folders["gru"] / exported.MANIFEST).read_text())
    assert manifest["metrics"] == loaded.metrics == json.loads((run.workdir / "result.json").read_text())
    assert manifest["inputs"]["ids"] == {"shape": ["batch", "length"], "dtype": "int32"}
    assert manifest["versions"]["jax"] == jax.__version__
    assert sorted(p.name for p in folders["gru"].iterdir()) == sorted(
        [exported.MANIFEST, exported.PARAMS, exported.ENCODER, "labels.json", *map(exported.program_file, (32, 48))])


@pytest.fixture(scope="module")
def verbalizer_run(tmp_path_factory):
    """A tiny verbalizer run (a random 2-layer BERT, two windows per text, a BatchNorm head), loaded."""
    from test_verbalizer import _cfg, _tiny_bert

    root = tmp_path_factory.mktemp("verbalizer")
    cfg = _cfg(_tiny_bert(root / "bert"), root)
    for split, n, seed in (("train", 48, 0), ("validation", 16, 1), ("test", 16, 2)):
        write_split(root / f"{split}.csv", ["neg", "pos"], n, seed)
        cfg.data[f"{split}_file"] = str(root / f"{split}.csv")
    cfg.data.update(name="csv", inputs="backbone_features", bucket_width=0, max_length=40)
    cfg.model.update(name="feature_mlp", head_sizes=(8,), dropout=0.0)
    cfg.train.update(epochs=1, batch_size=16, eval_batch_size=16)
    cfg.backbone.update(windows=2, pooling="layers_mean")
    cfg.checkpoint.async_save = False
    train.train_and_evaluate(cfg, root / "run")
    return inference.load(root / "run", name="verbalizer", batch_sizes=(8,))


@pytest.fixture(scope="module")
def verbalizer_folder(verbalizer_run, tmp_path_factory):
    return export.export(verbalizer_run.run, tmp_path_factory.mktemp("exports") / "verbalizer")


def test_a_verbalizer_export_runs_backbone_and_head_as_one_program(verbalizer_run, verbalizer_folder):
    loaded = exported.load(verbalizer_folder, batch_sizes=(3, 5))
    long = "good great film " * 20  # beyond two windows
    texts = [*TEXTS, long, "bad " * 9]  # one window, two, more than two: cut
    np.testing.assert_allclose(loaded.predict(texts), verbalizer_run.predict(texts), atol=1e-6)
    assert loaded.lengths == (32, 40) and loaded.kind == "feature_mlp"
    programs = sorted(p.name for p in verbalizer_folder.glob("*.jaxexport"))
    assert programs == [exported.program_file(32), exported.program_file(40)]  # one per bucket, nothing else
    from safetensors.numpy import load_file

    names = load_file(verbalizer_folder / exported.PARAMS)
    assert any(n.startswith("backbone/") for n in names) and any(n.startswith("params/") for n in names)


def test_loading_an_export_imports_no_training_code(folders, verbalizer_folder, tmp_path):
    """From copies of the folders alone; the training code, optax, Orbax and Flax stay unimported."""
    moved = [shutil.copytree(f, tmp_path / f.name) for f in (folders["transformer"], verbalizer_folder)]
    script = (f"import json, sys\nfrom sentiment_jax import exported\n"
              f"for folder in {[str(f) for f in moved]!r}:\n"
              f"    print(json.dumps(exported.load(folder).predict({TEXTS!r}).tolist()))\n"
              "print(json.dumps(sorted(sys.modules)))")
    env = child_env()
    path = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout first
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *probs, modules = map(json.loads, done.stdout.splitlines())
    for got, folder in zip(probs, (folders["transformer"], verbalizer_folder)):
        np.testing.assert_allclose(got, exported.load(folder).predict(TEXTS), atol=1e-6)
    heavy = [m for m in modules if m.split(".")[0] in ("optax", "orbax", "flax", "ml_collections", "absl")
             or m in ("sentiment_jax.models", "sentiment_jax.train", "sentiment_jax.runs",
                      "sentiment_jax.checkpoints", "sentiment_jax.inference", "sentiment_jax.verbalizer")]
    assert heavy == []
    assert "sentiment_jax.exported" in modules and "jax" in modules


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sentiment_jax.main", "--mode=predict", *args], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)


def test_the_predict_cli_takes_an_export_folder(folders):
    done = cli(f"--workdir={folders['gru']}", *TEXTS[:3])
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    labels = TINY_RUNS["gru"]["labels"]
    assert [r["model"] for r in records] == ["gru"] * 3
    got = [[r["probabilities"][n] for n in labels] for r in records]
    np.testing.assert_allclose(got, exported.load(folders["gru"]).predict(TEXTS[:3]), atol=1e-6)


def test_the_server_serves_an_export_beside_a_run(folders, predictors):
    from fastapi.testclient import TestClient

    from sentiment_jax import serve

    texts = [t for t in TEXTS if t][:4]  # the API refuses empty texts
    served = {"lstm": exported.load(folders["lstm"], name="lstm", batch_sizes=(1, 8)), "gru": predictors["gru"]}
    with TestClient(serve.create_app(served, ["k"])) as client:
        models = client.get("/v1/models", headers={serve.KEY_HEADER: "k"}).json()["models"]
        response = client.post("/v1/predict", json={"texts": texts, "model": "lstm"},
                               headers={serve.KEY_HEADER: "k"})
    assert response.status_code == 200, response.text
    probs = [[p["probabilities"][n] for n in ("neg", "pos")] for p in response.json()["predictions"]]
    np.testing.assert_allclose(probs, predictors["lstm"].predict(texts), atol=1e-6)
    lstm = models[0]
    assert (lstm["type"], lstm["labels"], lstm["checkpoint_step"]) == ("lstm", ["neg", "pos"],
                                                                      predictors["lstm"].checkpoint_step)
    assert lstm["metrics"]["accuracy"] == json.loads((folders["lstm"] / exported.MANIFEST).read_text())[
        "metrics"]["accuracy"]


def damage(folder, what):
    if what == "manifest":
        (folder / exported.MANIFEST).write_text('{"format": ')
    elif what == "program":
        file = folder / exported.program_file(48)
        file.write_bytes(file.read_bytes()[: 200])
    elif what == "missing params":
        (folder / exported.PARAMS).unlink()
    elif what == "other params":  # another model's parameters
        shutil.copy(folder.parent / "gru_src" / exported.PARAMS, folder / exported.PARAMS)


@pytest.mark.parametrize("what, error", [
    ("manifest", "manifest.json is not valid JSON; export the run again"),
    ("program", "forward_48.jaxexport is not a readable jax.export program; export the run again"),
    ("missing params", "params.safetensors not found; the export is incomplete"),
    ("other params", "params.safetensors does not hold the parameters the program takes"),
])
def test_a_damaged_export_is_one_clear_error(folders, tmp_path, what, error):
    shutil.copytree(folders["gru"], tmp_path / "gru_src")
    folder = shutil.copytree(folders["lstm"], tmp_path / "lstm")
    damage(folder, what)
    with pytest.raises(exported.ExportError, match=error):
        exported.load(folder)


def test_the_cli_reports_a_damaged_or_missing_export_in_one_line(folders, tmp_path):
    folder = shutil.copytree(folders["lstm"], tmp_path / "lstm")
    damage(folder, "program")
    done = cli(f"--workdir={folder}", "good")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {folder / exported.program_file(48)} is not a readable "
                                                "jax.export program; export the run again"]
    missing = tmp_path / "nothing"
    done = subprocess.run([sys.executable, "-m", "sentiment_jax.export", f"--workdir={missing}",
                           f"--output={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: no checkpoints in {missing}; train first or fix the workdir"]
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_overwrite_a_folder_that_is_not_an_export(predictors, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an export folder"):
        export.export(predictors["lstm"].run, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
