"""Shared test setup: 8 simulated CPU devices, one compilation cache for the whole test run, and the
real data when it is present."""

import atexit
import os
import pathlib
import shutil
import tempfile

# The test programs are tiny, so compiling them is most of the suite's time: XLA skips LLVM's
# optimisation passes (slower code; the suite passes either way), and every process of one test run (pytest-xdist
# workers, the command lines the tests start) shares a persistent compilation cache, so a program
# compiled once is read back elsewhere. Set here, before JAX starts and before the workers start.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sentiment_jax_test_compilation_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
                      XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip())

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests that compare 1 device against 8 need the 8 to exist before JAX starts.
jax.config.update("jax_num_cpu_devices", 8)

REPO = pathlib.Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """The environment for a process a test starts: this one's, on one CPU device (XLA_FLAGS holds only
    the test flags, no device count), sharing the compilation cache."""
    return {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS}


def data_root() -> pathlib.Path | None:
    """$SENTIMENT_JAX_DATA, else ../shared/data beside the checkout, else None."""
    for candidate in (os.environ.get("SENTIMENT_JAX_DATA"), REPO.parent / "shared" / "data"):
        if candidate and pathlib.Path(candidate).is_dir():
            return pathlib.Path(candidate)
    return None


@pytest.fixture
def real_data() -> pathlib.Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found; set SENTIMENT_JAX_DATA")
    return root


# ---------------------------------------------------------------------------------------
# Tiny trained runs for the inference, predict and serving tests.

CUES = {"pos": ["good", "great", "love", "superb"], "neg": ["bad", "awful", "hate", "boring"],
        "neu": ["okay", "average", "fine", "plain"]}  # by the first three letters of a class name
FILLER = ["the", "movie", "plot", "was", "and", "a", "film", "it"]


def write_split(path: pathlib.Path, labels: list[str], n: int, seed: int) -> None:
    """A CSV whose label is told by a few cue words among filler words."""
    import csv

    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = labels[i % len(labels)]
            words = list(rng.choice(FILLER, rng.integers(3, 40))) + list(rng.choice(CUES[label[:3]], 2))
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])


def tiny_flags(data_dir: pathlib.Path, run: dict) -> list[str]:
    """Command-line overrides of a config file for a tiny run of it on generated data."""
    overrides = {"data.name": "csv", "data.max_length": 48, "data.bucket_width": 0,
                 "data.tokenizer.vocab_size": 64, "train.epochs": 3, "train.batch_size": 16,
                 "train.eval_batch_size": 32, "train.learning_rate": 0.01, "checkpoint.async_save": False,
                 **run["flags"]}
    for split, n, seed in (("train", 160, 0), ("validation", 32, 1), ("test", 32, 2)):
        write_split(data_dir / f"{split}.csv", run["labels"], n, seed)
        overrides[f"data.{split}_file"] = data_dir / f"{split}.csv"
    return [f"--config={run['config']}", *(f"--config.{k}={v}" for k, v in overrides.items())]


# One tiny run per model type that the inference, predict and serving tests use; a new model
# type is one more entry (its config file and the overrides that make it small).
TINY_RUNS = {
    "lstm": {"config": "configs/lstm.py", "type": "lstm", "labels": ["neg", "pos"],
             "flags": {"model.embed_dim": 16, "model.hidden_sizes": "16,", "train.loss": "sigmoid"}},
    "gru": {"config": "configs/lstm.py", "type": "gru", "labels": ["negative", "neutral", "positive"],
            "flags": {"model.name": "gru", "model.embed_dim": 16, "model.hidden_sizes": "16,"}},
    "transformer": {"config": "configs/transformer.py", "type": "transformer", "labels": ["neg", "pos"],
                    "flags": {"model.embed_dim": 16, "model.num_layers": 1, "model.num_heads": 2,
                              "model.mlp_dim": 32}},
}


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Each of TINY_RUNS trained with the real command line, once for all pytest-xdist workers."""
    import subprocess
    import sys

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this test run's folder, shared by its workers
    root = root / "tiny_runs"
    with FileLock(f"{root}.lock"):
        if not (root / "done").is_file():
            env = child_env()
            procs = {}
            for name, run in TINY_RUNS.items():
                (root / f"{name}_data").mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "sentiment_jax.main", f"--workdir={root / name}", "--noplots",
                       *tiny_flags(root / f"{name}_data", run)]
                procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, text=True)
            for name, proc in procs.items():  # in parallel
                _, stderr = proc.communicate(timeout=600)
                assert proc.returncode == 0, f"training {name} failed:\n{stderr[-3000:]}"
            (root / "done").touch()
    return {name: root / name for name in TINY_RUNS}


@pytest.fixture(scope="session")
def predictors(trained_runs):
    """The tiny runs loaded for inference in this process; name -> inference.Predictor."""
    from sentiment_jax import inference

    return {name: inference.load(workdir, name=name, batch_sizes=(8, 16)) for name, workdir in trained_runs.items()}
