"""The GPU path checked in one command: tests, LSTM throughput, an IMDB run and MiniLM features.

  benchmarks/gpu_check.sh [--out=gpu_check.json] [--sections=tests,throughput,imdb,verbalizer]
  python benchmarks/gpu_check.py --platform=cpu --smoke --sections=throughput    # its CPU parts, tiny shapes

Runs on a CUDA machine whose Python already has JAX with its CUDA plugin and PyTorch. Nothing
comes from the network: the pure-Python packages the image lacks are installed from wheels in
`--wheels` (benchmarks/wheels; the command that downloads them is in docs/scaling.md) into a
folder of their own. Sections:

- tests: the real cuDNN kernel against the scan (tests/test_cudnn.py) and the train/eval tests
  that run on one device (GPU_TESTS), with pytest's counts.
- throughput: the peers' `uni` and `bi2` LSTMs at batch 64 and 256, float32 and bfloat16: our
  scan, our cuDNN path and PyTorch's nn.LSTM (cuDNN), all in this process, taking turns in rounds
  (each round rotates the order); ratios are per round, against PyTorch.
- imdb: configs/lstm.py with the cuDNN backend, 3 epochs, launch to test report split into data
  (load, tokenize, build the model), compile, train and eval, from JAX's compile log and the run's
  metrics.jsonl; and the test accuracy.
- verbalizer: MiniLM feature extraction, reviews/s, ours against PyTorch transformers
  (benchmarks/verbalizer_throughput.py).

Prints one table (measured value, target, met or not) and writes everything as JSON. Without a
GPU it stops at once with one line. `--platform=cpu --smoke` runs tiny shapes on the CPU, which is
how the tests check the parts that need no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

# Tests that make sense on one GPU: none of them needs 8 simulated devices.
GPU_TESTS = (
    "tests/test_cudnn.py::test_cudnn_layer_matches_the_scan_in_values_and_gradients",
    "tests/test_cudnn.py::test_cudnn_training_matches_the_scan_on_one_device",
    "tests/test_train.py::test_training_learns_and_writes_its_artifacts",
    "tests/test_train.py::test_eval_only_equals_end_of_training_and_runs_on_another_device_count",
    "tests/test_train.py::test_killed_and_resumed_run_ends_where_an_uninterrupted_one_does",
    "tests/test_train.py::test_cli_trains_then_evaluates_from_checkpoints",
    "tests/test_scale.py::test_bfloat16_computes_in_bf16_and_keeps_float32_parameters_and_optimizer_state",
    "tests/test_recurrent.py",
)

# Throughput grid: the peers' shapes (vocabulary 10,000, 200 tokens), or a tiny one for --smoke.
GRIDS = {
    "full": {"models": ("uni", "bi2"), "batches": (64, 256), "dtypes": ("float32", "bfloat16"),
             "length": 200, "vocab": 10_000, "rows": 8192, "chunk_seconds": 0.5},
    "smoke": {"models": ("uni",), "batches": (8,), "dtypes": ("float32",), "length": 12, "vocab": 100,
              "rows": 64, "chunk_seconds": 0.05},
}
TARGETS = {  # (row key, comparison, bound)
    "bi2 b256 float32 cudnn/torch": (">=", 1.0),
    "bi2 b256 bfloat16 cudnn/torch": (">=", 1.0),
    "imdb launch to report s": ("<=", 90.0),
    "imdb test accuracy": (">=", 0.88),
    "minilm reviews/s ours/torch": (">=", 1.0),
    "tests failed": ("<=", 0),
}


# ---------------------------------------------------------------------------------------
# Paired rounds.


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_rounds(runners: dict[str, Callable[[int], float]], steps: dict[str, int], batch: int, rounds: int,
                  baseline: str) -> dict:
    """Each round runs every contender once, in an order rotated by one each round, so slow drift
    in the machine hits all alike. runners[name](n) returns the seconds of n timed steps.
    Per contender: examples/s over its chunks, and the median of per-round ratios to `baseline`."""
    names = list(runners)
    rates = {name: [] for name in names}
    orders = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        orders.append(order)
        for name in order:
            rates[name].append(steps[name] * batch / runners[name](steps[name]))
    return {"orders": orders, "contenders": {
        name: {"examples_per_s": stats(rates[name]), "chunks": rates[name], "steps": steps[name],
               "ratio": stats([a / b for a, b in zip(rates[name], rates[baseline])])} for name in names}}


def steps_for(seconds_per_step: float, chunk_seconds: float) -> int:
    """Steps per chunk so one chunk takes about chunk_seconds (at least 2, at most 500)."""
    return int(min(max(round(chunk_seconds / max(seconds_per_step, 1e-9)), 2), 500))


# ---------------------------------------------------------------------------------------
# Throughput contenders.


def synthetic_arrays(rows: int, length: int, vocab: int, seed: int = 0):
    """Token ids shaped like the peers' arrays (front-padded, lengths 20..length); labels 0/1.
    Speed does not depend on the ids' values; exact masking on our side sees the padding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(rows, length)).astype(np.int32)
    lengths = rng.integers(min(20, length), length + 1, size=rows)
    ids[np.arange(length)[None, :] < (length - lengths)[:, None]] = 0
    return ids, rng.integers(0, 2, rows).astype(np.int32)


def jax_runner(model, dtype, batch, backend, ids, labels, vocab):
    sys.path.insert(0, str(HERE))
    import paired_lstm_contender  # the CPU paired bench's contender, at any batch and backend

    info, timed = paired_lstm_contender.contender(model, ids, labels, batch=batch, dtype=dtype, backend=backend,
                                                  vocab=vocab)
    return info, lambda n: timed(n)["seconds"]


def torch_runner(model, dtype, batch, ids, labels, vocab):
    """PyTorch's nn.LSTM (cuDNN on a GPU) in the peers' shapes: uni = Embedding(vocab, 128) -> LSTM(128)
    -> Linear(1), sigmoid loss; bi2 = 2-layer bidirectional LSTM(256), dropout 0.3 -> Linear(512, 128) ->
    ReLU -> Dropout(0.3) -> Linear(2), softmax loss; Adam 1e-3. bfloat16: torch.autocast."""
    import numpy as np
    import torch
    from torch import nn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    uni = model == "uni"
    embed = nn.Embedding(vocab, 128)
    lstm = (nn.LSTM(128, 128, batch_first=True) if uni else
            nn.LSTM(128, 256, num_layers=2, bidirectional=True, dropout=0.3, batch_first=True))
    head = nn.Linear(128, 1) if uni else nn.Sequential(nn.Linear(512, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 2))
    net = nn.ModuleDict({"embed": embed, "lstm": lstm, "head": head}).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)

    def step():
        rows = rng.integers(0, len(ids), batch)
        x = torch.from_numpy(ids[rows]).long().to(device, non_blocking=True)
        y = torch.from_numpy(labels[rows]).long().to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            _, (h, _) = net["lstm"](net["embed"](x))
            logits = net["head"](h[-1] if uni else torch.cat([h[-2], h[-1]], dim=-1)).float()
        loss = (nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float()) if uni else
                nn.functional.cross_entropy(logits, y))
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step().item()

    def run(n):
        step().item()  # untimed
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step()
        loss.item()  # waits for the GPU
        return time.perf_counter() - t0

    return {"peer": f"torch {torch.__version__} nn.LSTM on {device.type}", "model": model, "batch": batch,
            "dtype": dtype}, run


def throughput(grid: dict, rounds: int, on_gpu: bool, log) -> dict:
    """Every (model, batch, dtype) group of the grid as one paired run of its contenders."""
    ids, labels = synthetic_arrays(grid["rows"], grid["length"], grid["vocab"])
    groups = {}
    for model in grid["models"]:
        for batch in grid["batches"]:
            for dtype in grid["dtypes"]:
                key = f"{model} b{batch} {dtype}"
                builders = {"scan": lambda: jax_runner(model, dtype, batch, "scan", ids, labels, grid["vocab"])}
                if on_gpu:
                    builders["cudnn"] = lambda: jax_runner(model, dtype, batch, "cudnn", ids, labels, grid["vocab"])
                builders["torch"] = lambda: torch_runner(model, dtype, batch, ids, labels, grid["vocab"])
                infos, runners, steps, failed = {}, {}, {}, {}
                for name, build in builders.items():
                    try:
                        infos[name], runners[name] = build()
                    except Exception as e:  # e.g. torch cannot load beside JAX's CUDA libraries: keep ours
                        if name != "torch":
                            raise
                        failed[name] = f"{type(e).__name__}: {e}"
                        log(f"throughput {key}: torch failed: {failed[name]}")
                        continue
                    steps[name] = steps_for(runners[name](2) / 2, grid["chunk_seconds"])
                baseline = "torch" if "torch" in runners else "scan"
                result = paired_rounds(runners, steps, batch, rounds, baseline)
                result.update(baseline=baseline, info=infos, failed=failed)
                groups[key] = result
                log(f"throughput {key}: " + ", ".join(
                    f"{n} {c['examples_per_s']['median']:.0f} ex/s ({c['ratio']['median']:.2f}x {baseline})"
                    for n, c in result["contenders"].items()))
                del runners  # frees the models before the next group
    return groups


# ---------------------------------------------------------------------------------------
# The IMDB run and its timing split.

COMPILE_LINE = re.compile(r"Finished (?:tracing|jaxpr to MLIR module conversion|XLA compilation of) (\S+)"
                          r".* in ([0-9.eE+-]+) sec")
MODEL_BUILT = re.compile(r"trainable / [\d,]+ total parameters;")


def timing_split(lines: list[tuple[float, str]], epoch_seconds: list[float], total: float) -> dict:
    """Launch to report in four parts that add up to `total`, from the run's output lines (seconds since
    launch, text) with JAX's compile log on, and its epochs' training seconds (metrics.jsonl).

    data: launch until the model is built (imports, reading, tokenizing, initialising), less compiling;
    compile: every traced, lowered or compiled function; train: the epochs' seconds less the train step's
    compiles (which happen inside the first epoch); eval: the rest (validation, test, checkpoints)."""
    built = next((t for t, text in lines if MODEL_BUILT.search(text)), None)
    if built is None:
        raise ValueError("the run printed no 'trainable / ... total parameters' line: it did not start training")
    before = in_train = after = 0.0
    for t, text in lines:
        match = COMPILE_LINE.search(text)
        if not match:
            continue
        seconds = float(match.group(2))
        if t <= built:
            before += seconds
        elif "train_step" in match.group(1):
            in_train += seconds
        else:
            after += seconds
    epochs = sum(epoch_seconds)
    return {"data": built - before, "compile": before + in_train + after, "train": epochs - in_train,
            "eval": total - built - epochs - after, "total": total}


def imdb_run(workdir: pathlib.Path, flags: list[str], env: dict, log) -> dict:
    """configs/lstm.py (plus `flags`) from a fresh workdir, as a user runs it; timed from launch."""
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "sentiment_jax.main", "--config=configs/lstm.py", f"--workdir={workdir}", *flags]
    env = {**env, "JAX_LOG_COMPILES": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
    total = time.perf_counter() - t0
    if proc.wait() != 0:
        tail = "\n".join(text for _, text in lines[-15:])
        raise RuntimeError(f"IMDB run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    (workdir / "gpu_check_output.txt").write_text("\n".join(f"{t:9.3f} {text}" for t, text in lines) + "\n")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch_seconds"] for r in records if r.get("kind") == "epoch"]
    result = json.loads((workdir / "result.json").read_text())
    split = timing_split(lines, epochs, total)
    log("imdb: " + ", ".join(f"{k} {v:.1f} s" for k, v in split.items()) + f"; test accuracy {result['accuracy']:.4f}")
    return {"command": " ".join(cmd), "seconds": split, "epoch_seconds": epochs, "accuracy": result["accuracy"],
            "macro_f1": result["macro_f1"], "compile_log_lines": sum(bool(COMPILE_LINE.search(t)) for _, t in lines)}


# ---------------------------------------------------------------------------------------
# Tests and the verbalizer, as subprocesses.


def junit_counts(xml_text: str) -> dict:
    """passed / failed / skipped counts and the failing test ids of a pytest --junitxml report."""
    import xml.etree.ElementTree as ET

    counts, failing = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in ET.fromstring(xml_text).iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            counts["failed"] += 1
            failing.append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failing": failing}


def run_tests(out: pathlib.Path, env: dict, log) -> dict:
    report = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", *GPU_TESTS, "-q", "-n", "0", "-p", "no:cacheprovider",
           f"--junitxml={report}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if not report.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    result = {"command": " ".join(cmd), **junit_counts(report.read_text())}
    log(f"tests: {result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped")
    return result


def run_verbalizer(out: pathlib.Path, env: dict, log) -> dict:
    report = out / "verbalizer.json"
    cmd = [sys.executable, "benchmarks/verbalizer_throughput.py", "--num=2048", "--max_length=256",
           "--batch_size=128", f"--json_out={report}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"verbalizer benchmark failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    result = {"command": " ".join(cmd), **json.loads(report.read_text())}
    log(f"verbalizer: ours {result['jax_reviews_per_s']:.0f}, torch {result['torch_reviews_per_s']:.0f} reviews/s")
    return result


# ---------------------------------------------------------------------------------------
# The summary.


def summary_rows(results: dict) -> list[dict]:
    """One row per figure: {key, value, target, met}; met is None where there is no target."""
    values = {}
    for key, group in results.get("throughput", {}).items():
        base = group.get("baseline", "torch")
        for name, c in group["contenders"].items():
            values[f"{key} {name} ex/s"] = c["examples_per_s"]["median"]
            if name != base:
                values[f"{key} {name}/{base}"] = c["ratio"]["median"]
    if "imdb" in results:
        for part, seconds in results["imdb"]["seconds"].items():
            values["imdb launch to report s" if part == "total" else f"imdb {part} s"] = seconds
        if results["imdb"].get("compile_log_lines") == 0:  # then compiling counts as train and eval
            values["imdb compile s"] = "no compile lines in the run's log: JAX's message format changed?"
        values["imdb test accuracy"] = results["imdb"]["accuracy"]
    if "verbalizer" in results:
        v = results["verbalizer"]
        values["minilm reviews/s ours"], values["minilm reviews/s torch"] = v["jax_reviews_per_s"], v["torch_reviews_per_s"]
        values["minilm reviews/s ours/torch"] = v["jax_reviews_per_s"] / v["torch_reviews_per_s"]
    if "tests" in results:
        for k in ("passed", "failed", "skipped"):
            values[f"tests {k}"] = results["tests"][k]
    for section, message in results.get("errors", {}).items():
        values[f"{section} error"] = message.splitlines()[0]
    rows = []
    for key, value in values.items():
        op, bound = TARGETS.get(key, (None, None))
        met = None if op is None or isinstance(value, str) else (value >= bound if op == ">=" else value <= bound)
        rows.append({"key": key, "value": value, "target": f"{op} {bound}" if op else "", "met": met})
    return rows


def format_table(rows: list[dict]) -> str:
    def show(v):
        return v if isinstance(v, str) else f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else (
            f"{v:.1f}" if isinstance(v, float) else str(v))

    cells = [(r["key"], show(r["value"]), r["target"], {True: "met", False: "NOT MET", None: ""}[r["met"]])
             for r in rows]
    header = ("figure", "value", "target", "")
    widths = [max(len(c[i]) for c in cells + [header]) for i in range(4)]
    line = lambda c: "  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip()
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(c) for c in cells])


# ---------------------------------------------------------------------------------------
# Set-up and the command line.


def wheel_name(filename: str) -> str:
    """The distribution name of a wheel file, normalised as importlib.metadata finds it."""
    return re.sub(r"[-_.]+", "-", filename.split("-")[0]).lower()


def install_missing_wheels(folder: pathlib.Path, site: pathlib.Path, log) -> list[str]:
    """Installs (offline, without dependencies) each wheel in `folder` whose distribution this Python
    lacks, into `site`, which then goes first on the import path of this process and its children."""
    from importlib import metadata

    site.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH")) if p)
    missing = []
    for wheel in sorted(folder.glob("*.whl")):
        try:
            metadata.distribution(wheel_name(wheel.name))
        except metadata.PackageNotFoundError:
            missing.append(wheel)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, missing)], check=True)
        log(f"installed from {folder}: {', '.join(wheel_name(w.name) for w in missing)}")
    return [wheel_name(w.name) for w in missing]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--smoke", action="store_true", help="tiny throughput shapes and few rounds (CPU checks)")
    ap.add_argument("--sections", default="tests,throughput,imdb,verbalizer")
    ap.add_argument("--out", default="gpu_check.json", help="where the JSON goes")
    ap.add_argument("--workdir", default="runs/gpu_check", help="the IMDB run and the test report")
    ap.add_argument("--rounds", type=int, default=0, help="paired rounds per group (default 5; --smoke 2)")
    ap.add_argument("--wheels", default="", help="folder of wheels to install offline where missing")
    ap.add_argument("--site", default="/tmp/gpu_check_site", help="where those wheels go")
    ap.add_argument("--imdb_flags", default="--config.model.lstm_backend=cudnn",
                    help="extra flags of the IMDB run, space-separated")
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - {"tests", "throughput", "imdb", "verbalizer"}
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from tests, throughput, imdb, verbalizer")
    args.rounds = args.rounds or (2 if args.smoke else 5)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    # The JAX and PyTorch contenders share one GPU here: JAX allocates as it goes instead of taking 75% up
    # front. The runs in subprocesses (tests, IMDB, verbalizer) keep JAX's default.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if args.platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
    else:
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if not gpus:
            print(f"gpu_check: no CUDA GPU visible to JAX {jax.__version__} (devices: {jax.devices()}); run it on a "
                  "machine with a GPU and jax's CUDA plugin, or pass --platform=cpu --smoke", file=sys.stderr)
            return 2
    if args.wheels and pathlib.Path(args.wheels).is_dir():
        install_missing_wheels(pathlib.Path(args.wheels), pathlib.Path(args.site), log)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = pathlib.Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"platform": args.platform, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "errors": {}}
    sections = {
        "tests": lambda: run_tests(out, env, log),
        "throughput": lambda: throughput(GRIDS["smoke" if args.smoke else "full"], args.rounds,
                                         args.platform == "gpu", log),
        "imdb": lambda: imdb_run(out / "imdb_lstm", args.imdb_flags.split(), env, log),
        "verbalizer": lambda: run_verbalizer(out, env, log),
    }
    t0, results["section_seconds"] = time.perf_counter(), {}
    for name in args.sections:
        log(f"{name} ...")
        started = time.perf_counter()
        try:
            results[name] = sections[name]()
        except Exception as e:  # one failing section must not hide the others' figures
            results["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"{name} failed: {results['errors'][name]}")
        results["section_seconds"][name] = time.perf_counter() - started  # what sizes a rerun
    results["seconds"] = time.perf_counter() - t0
    results["rows"] = summary_rows(results)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    print(format_table(results["rows"]))
    print(f"{results['seconds']:.0f} s; JSON: {args.out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
