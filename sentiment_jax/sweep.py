"""Sweeps: many training runs from one spec, each in its own folder, summarised in one table.

A sweep file (see `configs/sweeps/`) has `get_sweep(preset)` returning a dict:

  config    the base config file, `FILE.py[:VARIANT]`
  set       {field: value} applied to every run, e.g. {"train.epochs": 2}
  variants  optional [{"name": ..., "config": FILE, "set": {...}}]: named runs, e.g. one per model
  grid      optional {field: [values]}: every combination, crossed with every variant
  seeds     optional [0, 1, 2]: each configuration once per seed (sets `seed`)
  compare   optional, default True; False when the rows are different tasks (e.g. one per
            language) rather than rival configurations: no best mark, an average row instead
  behaviour optional: a behavioural test suite (sentiment_jax/suites/, "auto" for each run's
            language) run on every configuration, its table appended to summary.md

Runs land in WORKDIR/NAME/seed_S. A folder with `result.json` is done and skipped, an
interrupted one resumes from its checkpoints, and a run that fails is recorded in the
summary (with its error in `error.txt`) while the others go on. The best configuration
is chosen by mean validation accuracy (macro-F1 when the runs pick checkpoints by it), never by test.
Every other configuration is then compared with it on the same test examples: a paired bootstrap
interval of the accuracy and macro-F1 difference and McNemar's exact test (first finished seed of each).

  python -m sentiment_jax.sweep --sweep=configs/sweeps/compare.py:quick --workdir=runs/compare
  python -m sentiment_jax.sweep --sweep=configs/sweeps/lstm_shapes.py:full --workdir=runs/shapes \
      --seeds=0,1,2 --set=train.epochs=2
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import pathlib
import sys
import traceback

import ml_collections
import numpy as np
from absl import app, flags, logging

from sentiment_jax import config_base, metrics, runs, train
from sentiment_jax._extras import MissingExtra

REPO = pathlib.Path(__file__).resolve().parent.parent
SPEC_KEYS = {"config", "set", "variants", "grid", "seeds", "compare", "behaviour"}


class SweepError(ValueError):
    """A mistake in a sweep spec, phrased as one line."""


def load_python_file(spec: str, function: str):
    """Calls `function(VARIANT)` (or `function()`) of a Python file given as `FILE.py[:VARIANT]`.

    The file may import modules beside it (as a script can), e.g. `configs/sweeps/presets.py`.
    """
    file, _, variant = spec.partition(":")
    path = pathlib.Path(file)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        path = REPO / path  # paths in sweep files are relative to the repository
    if not path.is_file():
        raise SweepError(f"{file}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    if not hasattr(module, function):
        raise SweepError(f"{file} has no {function}()")
    return getattr(module, function)(variant) if variant else getattr(module, function)()


def set_field(cfg: ml_collections.ConfigDict, field: str, value, where: str) -> None:
    """cfg['a.b.c'] = value, with an unknown field or a wrong type as one line."""
    *path, leaf = field.split(".")
    node = cfg
    for key in path:
        if key not in node or not isinstance(node[key], ml_collections.ConfigDict):
            raise SweepError(f"unknown config field '{field}' in {where}; see sentiment_jax/config_base.py")
        node = node[key]
    if leaf not in node:
        raise SweepError(f"unknown config field '{field}' in {where}; see sentiment_jax/config_base.py")
    try:
        node[leaf] = value
    except TypeError:
        raise SweepError(f"{field}={value!r} in {where}: expected a {type(node[leaf]).__name__}") from None


def parse_value(text: str):
    """A command-line value: a Python literal if it is one ('64,32' -> (64, 32)), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclasses.dataclass
class Run:
    name: str  # the configuration; seeds of one configuration share it
    seed: int
    cfg: ml_collections.ConfigDict

    @property
    def folder(self) -> str:
        return f"{self.name}/seed_{self.seed}"


def _label(value) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(str(v) for v in value) or "none"
    return str(value)


def expand(spec: dict, overrides: dict | None = None, where: str = "sweep") -> list[Run]:
    """Every run of a sweep, with configs built and checked (so mistakes surface before training)."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SweepError(f"unknown key(s) {sorted(unknown)} in {where}; use {sorted(SPEC_KEYS)}")
    variants = spec.get("variants") or [{"name": "", "config": spec.get("config")}]
    grid = spec.get("grid") or {}
    seeds = list(spec.get("seeds") or [0])
    runs_, names = [], set()
    for variant in variants:
        config_file = variant.get("config") or spec.get("config")
        if not config_file:
            raise SweepError(f"{where}: variant '{variant.get('name')}' has no config file")
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            name = "_".join(p for p in [variant.get("name", "")] +
                            [f"{f.split('.')[-1]}={_label(v)}" for f, v in point.items()] if p) or "run"
            if name in names:
                raise SweepError(f"{where}: two runs are both named '{name}'; give the variants distinct names")
            names.add(name)
            for seed in seeds:
                cfg = load_python_file(config_file, "get_config")
                for field, value in [*(spec.get("set") or {}).items(), *(variant.get("set") or {}).items(),
                                     *point.items(), *(overrides or {}).items(), ("seed", seed)]:
                    set_field(cfg, field, value, f"{where} ({name})")
                config_base.check_config(cfg)
                runs_.append(Run(name, seed, cfg))
    return runs_


# ---------------------------------------------------------------------------------------
# Running.


OTHER_CONFIG = "the folder holds a run of another config; use another --workdir"


def _same_config(cfg, folder: pathlib.Path) -> bool:
    if not (folder / runs.CONFIG_FILE).is_file():
        return True
    as_json = lambda c: json.loads(c.to_json_best_effort())
    return as_json(runs.load_config(folder)) == as_json(cfg)


def run_all(sweep_runs: list[Run], workdir: pathlib.Path) -> None:
    """Trains each run that has no result yet; a failure is written down, not raised."""
    for i, run in enumerate(sweep_runs, 1):
        folder = workdir / run.folder
        if not _same_config(run.cfg, folder):
            print(f"[{i}/{len(sweep_runs)}] {run.folder}: {OTHER_CONFIG}", flush=True)
            continue
        if runs.read_result(folder) is not None:
            print(f"[{i}/{len(sweep_runs)}] {run.folder}: done, skipped", flush=True)
            continue
        print(f"[{i}/{len(sweep_runs)}] {run.folder}: training", flush=True)
        (folder / "error.txt").unlink(missing_ok=True)
        try:
            train.train_and_evaluate(run.cfg, folder)
        except Exception as e:  # noqa: BLE001 - one broken run must not end the sweep
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "error.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
            print(f"[{i}/{len(sweep_runs)}] {run.folder}: FAILED ({type(e).__name__}: {e})", flush=True)


# ---------------------------------------------------------------------------------------
# Summaries.

RUN_COLUMNS = ("name", "seed", "status", "trainable_params", "total_params", "val_accuracy", "val_macro_f1",
               "test_accuracy", "test_macro_f1", "test_ece", "test_ece_scaled", "train_seconds", "examples_per_s",
               "error")


def run_row(run: Run, workdir: pathlib.Path) -> dict:
    """One run's figures; validation ones from the epoch the best checkpoint was chosen by."""
    folder = workdir / run.folder
    row = {"name": run.name, "seed": run.seed, "status": "not run", "folder": run.folder}
    if not _same_config(run.cfg, folder):
        return {**row, "status": "failed", "error": OTHER_CONFIG}
    result, epochs = runs.read_result(folder), runs.read_metrics(folder, "epoch")
    if (folder / "error.txt").is_file():
        row.update(status="failed", error=(folder / "error.txt").read_text().splitlines()[0])
    if result is None:
        return row
    metric = "val/" + run.cfg.checkpoint.best_metric
    scored = [e for e in epochs if metric in e]  # none in a refit (data.train_on_validation)
    best = max(scored, key=lambda e: e[metric]) if scored else {}
    row.update(status="done", trainable_params=result.get("trainable_params"),
               total_params=result.get("total_params"), val_accuracy=best.get("val/accuracy"),
               val_macro_f1=best.get("val/macro_f1"), test_accuracy=result["accuracy"],
               test_macro_f1=result["macro_f1"], test_ece=result.get("ece"),
               # After temperature scaling fitted on validation (eval.calibrate), else None.
               test_ece_scaled=(result.get("temperature_scaling") or {}).get("ece"),
               train_seconds=sum(e["epoch_seconds"] for e in epochs),
               # The last epoch's rate: the first one also pays for compilation.
               examples_per_s=epochs[-1]["train/examples_per_s"] if epochs else None)
    return row


MEAN_COLUMNS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1", "test_ece", "test_ece_scaled",
                "train_seconds", "examples_per_s")


def group_rows(rows: list[dict], compare: bool = True, metric: str = "accuracy") -> list[dict]:
    """One row per configuration: mean and sample standard deviation over its finished seeds.

    With `compare`, the best by mean validation `metric` (accuracy | macro_f1, what the runs chose
    checkpoints by) is marked; without, an "average" row (the mean of the configurations' means) is
    appended instead.
    """
    groups = []
    for name in dict.fromkeys(r["name"] for r in rows):
        members = [r for r in rows if r["name"] == name]
        done = [r for r in members if r["status"] == "done"]
        group = {"name": name, "seeds": len(done), "runs": len(members), "folder": done[0]["folder"] if done else None,
                 "trainable_params": done[0]["trainable_params"] if done else None,
                 "total_params": done[0]["total_params"] if done else None}
        for column in MEAN_COLUMNS:
            values = [r[column] for r in done if r.get(column) is not None]
            group[column] = float(np.mean(values)) if values else None
            group[column + "_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        groups.append(group)
    scored = [g for g in groups if g["val_" + metric] is not None]
    best = max(scored, key=lambda g: g["val_" + metric], default=None) if compare else None
    for g in groups:
        g["best"] = g is best
    if not compare and scored:
        average = {"name": f"average of {len(scored)}", "seeds": sum(g["seeds"] for g in scored),
                   "runs": sum(g["runs"] for g in scored), "trainable_params": None, "total_params": None,
                   "best": False}
        for column in MEAN_COLUMNS:
            values = [g[column] for g in scored if g[column] is not None]
            average[column] = float(np.mean(values)) if values else None
            average[column + "_std"] = None
        groups.append(average)
    return groups


def _cell(group: dict, column: str, scale: float = 1.0, digits: int = 2) -> str:
    mean, std = group.get(column), group.get(column + "_std")
    if mean is None:
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def _ece_cell(group: dict) -> str:
    """Test ECE, and after temperature scaling where the runs fitted one."""
    scaled = group.get("test_ece_scaled")
    return _cell(group, "test_ece", 1, 3) + ("" if scaled is None else f" → {_cell(group, 'test_ece_scaled', 1, 3)}")


def add_significance(groups: list[dict], workdir: pathlib.Path) -> None:
    """Sets `vs_best` of each configuration tested on the best one's test examples: metrics.paired_difference
    of its first finished seed minus the best's."""
    best = next((g for g in groups if g["best"]), None)
    predictions = {g["name"]: runs.read_predictions(workdir / g["folder"]) for g in groups if g.get("folder")}
    if best is None or predictions.get(best["name"]) is None:
        return
    labels = predictions[best["name"]]["labels"]
    same = {n: p for n, p in predictions.items() if p is not None and np.array_equal(p["labels"], labels)}
    for name, s in metrics.against_best(same, best["name"]).items():
        next(g for g in groups if g["name"] == name)["vs_best"] = s


def behaviour_table(groups: list[dict], workdir: pathlib.Path, suite: str) -> str | None:
    """The behavioural suite on each configuration's first finished seed, side by side (files in
    WORKDIR/behaviour/); None when nothing has finished."""
    from sentiment_jax import behaviour

    done = {g["name"]: workdir / g["folder"] for g in groups if g.get("folder")}
    if not done:
        return None
    _, text = behaviour.run(list(done.values()), names=list(done), suite=None if suite == "auto" else suite,
                            out=workdir / "behaviour")
    return text


def markdown_table(groups: list[dict]) -> str:
    compare = any(g["best"] for g in groups)
    lines = ["| run | seeds | trainable / total params | val acc % | test acc % | test macro-F1 | "
             "test ECE (→ after T) | train s | train ex/s |" + (f" {metrics.SIGNIFICANCE_HEADER} |" if compare else ""),
             "|" + " --- |" * (12 if compare else 9)]
    for g in groups:
        params = (f"{g['trainable_params']:,} / {g['total_params']:,}" if g["trainable_params"] is not None
                  else "–")
        name = f"**{g['name']}** (best)" if g["best"] else g["name"]
        seeds = f"{g['seeds']}/{g['runs']}" + ("" if g["seeds"] == g["runs"] else " (see failures)")
        lines.append(f"| {name} | {seeds} | {params} | {_cell(g, 'val_accuracy', 100)} | "
                     f"{_cell(g, 'test_accuracy', 100)} | {_cell(g, 'test_macro_f1', 1, 4)} | {_ece_cell(g)} | "
                     f"{_cell(g, 'train_seconds', 1, 0)} | {_cell(g, 'examples_per_s', 1, 0)} |" +
                     (f" {metrics.significance_cell(g.get('vs_best'))} | "
                      f"{metrics.significance_cell(g.get('vs_best'), 'macro_f1')} | {metrics.p_cell(g.get('vs_best'))} |"
                      if compare else ""))
    return "\n".join(lines)


def summarize(sweep_runs: list[Run], workdir: pathlib.Path, compare: bool = True, behaviour: str | None = None) -> dict:
    """Writes summary.md, summary.csv (one row per run) and summary.json; returns the JSON. With `behaviour`
    (a suite, "auto" for each run's language) the behavioural table of the configurations goes in too."""
    rows = [run_row(r, workdir) for r in sweep_runs]
    metrics = {r.cfg.checkpoint.best_metric for r in sweep_runs}  # e.g. macro_f1 for NusaX
    metric = metrics.pop() if len(metrics) == 1 else "accuracy"
    groups = group_rows(rows, compare, metric)
    add_significance(groups, workdir)
    failures = [f"- {r['folder']}: {r.get('error', 'not run')}" for r in rows if r["status"] != "done"]
    legend = (f"Best (by mean validation {metric.replace('_', '-')}) in bold; Δ: each configuration minus the best "
              "on the same test examples, with a paired bootstrap 95% interval and McNemar's exact p." if compare
              else "Last row: the mean of the rows above.")
    table = behaviour_table(groups, workdir, behaviour) if behaviour else None
    text = "\n".join(["# Sweep summary", "", f"{legend} Folder: `{workdir}`.",
                      "", markdown_table(groups)] + (["", "Not finished:", *failures] if failures else []) +
                     (["", "## Behavioural tests", "", table] if table else []))
    (workdir / "summary.md").write_text(text + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RUN_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (workdir / "summary.csv").write_text(buffer.getvalue())
    summary = {"runs": rows, "configurations": groups, **({"behaviour": table} if table else {})}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_sweep(spec_file: str, workdir: str | pathlib.Path, overrides: dict | None = None,
              seeds: list[int] | None = None, plots: bool = True) -> dict:
    """Expands, trains what is missing, summarises and draws; returns the summary."""
    workdir = pathlib.Path(workdir)
    spec = load_python_file(spec_file, "get_sweep")
    if seeds:
        spec = {**spec, "seeds": seeds}
    sweep_runs = expand(spec, overrides, where=spec_file)
    workdir.mkdir(parents=True, exist_ok=True)
    run_all(sweep_runs, workdir)
    summary = summarize(sweep_runs, workdir, compare=spec.get("compare", True), behaviour=spec.get("behaviour"))
    if plots:
        from sentiment_jax import plots as plots_lib

        plots_lib.sweep_figures(workdir, summary)
    return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so the modules can be imported together."""
    flags.DEFINE_string("sweep", None, "Sweep file, FILE.py[:PRESET] (see configs/sweeps/).", required=True)
    flags.DEFINE_string("workdir", None, "Sweep folder: one subfolder per run, summary files at the top.",
                        required=True)
    flags.DEFINE_multi_string("set", [], "FIELD=VALUE for every run, e.g. --set=train.epochs=1 (repeatable).")
    flags.DEFINE_list("seeds", [], "Seeds to run each configuration with, e.g. 0,1,2 (default: the sweep's).")
    flags.DEFINE_bool("plots", True, "Draw curves, F1 bars and confusion matrices.")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        overrides = {}
        for item in FLAGS.set:
            field, sep, value = item.partition("=")
            if not sep:
                raise SweepError(f"--set={item}: expected FIELD=VALUE")
            overrides[field] = parse_value(value)
        summary = run_sweep(FLAGS.sweep, FLAGS.workdir, overrides, [int(s) for s in FLAGS.seeds], FLAGS.plots)
    except (SweepError, MissingExtra, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(summary["configurations"]))
    print(f"summary and figures in {FLAGS.workdir}")
    if any(r["status"] != "done" for r in summary["runs"]):
        sys.exit(1)


def run() -> None:
    """The `sentiment-jax-sweep` command, the same as `python -m sentiment_jax.sweep`."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
