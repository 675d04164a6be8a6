"""Figures from run folders: training curves (runs overlaid), confusion matrices, F1 bars.

Everything is read back from the files a run writes (`metrics.jsonl`, `result.json`), so
figures can be redrawn at any time without the models.

  python -m sentiment_jax.plots runs/lstm                       # one run
  python -m sentiment_jax.plots runs/compare_quick              # a sweep (has summary.json)
  python -m sentiment_jax.plots runs/lstm runs/transformer --out=runs/lstm_vs_transformer
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sentiment_jax import files, runs  # noqa: E402


def training_curves(folders: dict[str, list[pathlib.Path]], out: pathlib.Path) -> pathlib.Path:
    """Loss, accuracy and learning rate against the training step; one colour per name.

    Thin lines are the train loss of each logged step (the mean since the previous log), dots the
    epoch averages (train solid, validation dashed). `folders` maps a label to its runs (several
    seeds share a colour and a legend entry).
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, paths) in enumerate(folders.items()):
        color = colors[i % len(colors)]
        for j, path in enumerate(paths):
            name = lambda what: f"{label} {what}" if j == 0 else None
            records = runs.read_metrics(path)
            # Runs older than train/step_loss logged only the running mean since the epoch began.
            logged = [(r["step"], r.get("train/step_loss", r.get("train/running_loss"))) for r in records
                      if "train/step_loss" in r or "train/running_loss" in r]
            axes[0].plot([s for s, _ in logged], [v for _, v in logged], "-", color=color, lw=0.8, alpha=0.6,
                         label=name("train, per logged step"))
            rates = [r for r in records if "train/learning_rate" in r]
            axes[2].plot([r["step"] for r in rates], [r["train/learning_rate"] for r in rates], "-", color=color,
                         label=name("learning rate"))
            epochs = [r for r in records if r.get("kind") == "epoch"]
            x = [e["step"] for e in epochs]
            for ax, metric in zip(axes, ("loss", "accuracy")):
                ax.plot(x, [e[f"train/{metric}"] for e in epochs], "-o", color=color, ms=3,
                        label=name("train, epoch"))
                if epochs and f"val/{metric}" in epochs[0]:
                    ax.plot(x, [e[f"val/{metric}"] for e in epochs], "--s", color=color, ms=3,
                            label=name("validation, epoch"))
    for ax, metric in zip(axes, ("loss", "accuracy", "learning rate")):
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(metric, fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return save_figure(fig, out)


def confusion_figure(result: dict, title: str = ""):
    """A classification report's confusion matrix: rows true class, columns predicted; colour is the
    row fraction, text the count."""
    names = list(result["per_class"])
    counts = np.asarray(result["confusion_matrix"])
    fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = 1.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, f"{n}\n{fractions[i, j]:.1%}", ha="center", va="center", fontsize=9,
                color="white" if fractions[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"test accuracy {result['accuracy']:.2%}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    return fig


def confusion_matrix(result: dict, out: pathlib.Path, title: str = "") -> pathlib.Path:
    return save_figure(confusion_figure(result, title), out)


def f1_bars(results: dict[str, list[dict]], out: pathlib.Path) -> pathlib.Path:
    """Per-class and macro F1 on test for each name; with several seeds, the mean and a std bar."""
    names = list(results)
    classes = list(next(iter(results.values()))[0]["per_class"]) if names else []
    series = [*classes, "macro"]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) * len(series) / 2 + 2), 4))
    for k, s in enumerate(series):
        values = [[r["macro_f1"] if s == "macro" else r["per_class"][s]["f1"] for r in results[n]]
                  for n in names]
        means = [np.mean(v) for v in values]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
        x = np.arange(len(names)) + (k - (len(series) - 1) / 2) * width
        bars = ax.bar(x, means, width, yerr=stds, capsize=3, label=s, hatch="//" if s == "macro" else None,
                      edgecolor="black" if s == "macro" else None)
        if s == "macro":
            ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0, ha="right"
                  if len(names) > 4 else "center")
    ax.set_ylabel("test F1")
    ax.set_ylim(0, 1.08)
    ax.set_title("test F1 per class and macro-F1 (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def reliability_diagram(curves: dict[str, dict], out: pathlib.Path) -> pathlib.Path:
    """Accuracy against mean confidence per bin (metrics.calibration_bins), one line per curve; the
    diagonal is perfect calibration and the bars below show how many examples fall in each bin."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 5.6), sharex=True, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
    for k, (label, b) in enumerate(curves.items()):
        used = np.asarray(b["count"]) > 0
        ax.plot(np.asarray(b["confidence"])[used], np.asarray(b["accuracy"])[used], "-o", ms=4, label=label)
        edges = np.linspace(0, 1, len(b["count"]) + 1)
        width = (edges[1] - edges[0]) / len(curves)
        counts.bar(edges[:-1] + k * width, b["count"], width, align="edge", label=label)
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (equal-width bins of the top probability)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    counts.set_xlabel("confidence")
    counts.set_ylabel("examples")
    counts.set_yscale("log")
    counts.set_xlim(0, 1)
    fig.tight_layout()
    return save_figure(fig, out)


def failure_rates(rates: dict[str, dict[str, float | None]], out: pathlib.Path) -> pathlib.Path:
    """Behavioural failure rate per capability (behaviour.py), one bar per run side by side; n/a left out."""
    names = list(rates)
    capabilities = list(dict.fromkeys(c for r in rates.values() for c in r))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(capabilities) * max(len(names), 2) / 2 + 2), 4))
    for k, name in enumerate(names):
        values = [rates[name].get(c) for c in capabilities]
        x = np.arange(len(capabilities)) + (k - (len(names) - 1) / 2) * width
        ax.bar(x, [np.nan if v is None else 100 * v for v in values], width, label=name)
    ax.set_xticks(range(len(capabilities)), capabilities, rotation=30, ha="right")
    ax.set_ylabel("failure rate %")
    ax.set_ylim(0, 100)
    ax.set_title("behavioural tests: failure rate per capability (lower is better)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig, out: str | pathlib.Path) -> pathlib.Path:
    """Saved atomically (files.atomic_path), so a reader never holds half an image; the format is named,
    since the temporary file's name does not end in it."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix[1:] or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def run_figures(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """curves.png, and once the run has finished confusion.png and f1.png, in the run folder."""
    folder = pathlib.Path(folder)
    if not (folder / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{folder / 'metrics.jsonl'} not found; is {folder} a run folder?")
    written = [training_curves({folder.name: [folder]}, folder / "curves.png")]
    result = runs.read_result(folder)
    if result is not None:
        written.append(confusion_matrix(result, folder / "confusion.png", title=f"{folder.name}: test accuracy "
                                                                                f"{result['accuracy']:.2%}"))
        written.append(f1_bars({folder.name: [result]}, folder / "f1.png"))
    return written


def sweep_figures(workdir: str | pathlib.Path, summary: dict | None = None) -> list[pathlib.Path]:
    """curves.png and f1.png over all configurations, and confusion.png in each finished run."""
    workdir = pathlib.Path(workdir)
    summary = summary or json.loads((workdir / "summary.json").read_text())
    done = [r for r in summary["runs"] if r["status"] == "done"]
    if not done:
        return []
    by_name: dict[str, list[pathlib.Path]] = {}
    for r in done:
        by_name.setdefault(r["name"], []).append(workdir / r["folder"])
    written = [training_curves(by_name, workdir / "curves.png"),
               f1_bars({n: [runs.read_result(p) for p in ps] for n, ps in by_name.items()}, workdir / "f1.png")]
    for r in done:
        folder = workdir / r["folder"]
        written.append(confusion_matrix(runs.read_result(folder), folder / "confusion.png",
                                        title=f"{r['folder']}: test accuracy {r['test_accuracy']:.2%}"))
    return written


def main(argv: list[str]) -> None:
    folders = [pathlib.Path(a) for a in argv if not a.startswith("--")]
    out = next((pathlib.Path(a.split("=", 1)[1]) for a in argv if a.startswith("--out=")), None)
    if not folders:
        print("usage: python -m sentiment_jax.plots RUN_OR_SWEEP_DIR [MORE_RUN_DIRS --out=DIR]", file=sys.stderr)
        sys.exit(2)
    try:
        if len(folders) > 1:  # several runs side by side
            missing = [f for f in folders if not (f / "metrics.jsonl").is_file()]
            if missing:
                raise FileNotFoundError(f"{missing[0] / 'metrics.jsonl'} not found; is it a run folder?")
            out = out or folders[0].parent / "comparison"
            named = {f.name: [f] for f in folders}
            written = [training_curves(named, out / "curves.png")]
            results = {f.name: [runs.read_result(f)] for f in folders if runs.read_result(f) is not None}
            if results:
                written.append(f1_bars(results, out / "f1.png"))
        elif (folders[0] / "summary.json").is_file():
            written = sweep_figures(folders[0])
        else:
            written = run_figures(folders[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(str(w) for w in written))


if __name__ == "__main__":
    main(sys.argv[1:])
