"""Behavioural tests: generated sentences that probe what a trained model does, capability by capability.

  python -m sentiment_jax.behaviour --workdir=runs/lstm [--workdir=runs/nb_linear ...] [--suite=english]

A suite (`sentiment_jax/suites/LANGUAGE.json`, or any file of that shape) is data: lexicons, labelled
templates and tests. Three kinds of test, after CheckList (Ribeiro et al. 2020):

  mft  minimum functionality: filled templates with a label ("not good" is negative); a case fails
       when the predicted class is not one the label allows ("not negative" allows neutral too).
  inv  invariance: a case is a filled template and a perturbed copy that keeps its meaning (a typo in a
       word without sentiment, another name, an added neutral sentence); it fails when the
       predicted class changes.
  dir  directional: the perturbation should push one class (a positive sentence appended); it fails
       when that class's probability falls by more than the suite's tolerance.

Cases are drawn from the lexicons with a seed (each test from its own stream, so adding a test
leaves the others' cases alone) and written beside the report, so a report can be read against
the exact sentences it scored.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import re
import sys
from typing import Protocol, Sequence

import numpy as np

SUITES = pathlib.Path(__file__).resolve().parent / "suites"
KINDS = ("mft", "inv", "dir")
LABELS = ("positive", "negative", "neutral", "not positive", "not negative")
PERTURBATIONS = ("typo", "punctuation_case")  # and {"swap": SLOT}, {"add": LEXICON}, {"append": LEXICON}
SLOT = re.compile(r"\{(\w+)\}")
EXAMPLES = 3  # failing examples kept per test


class Model(Protocol):
    label_names: Sequence[str]

    def predict(self, texts: Sequence[str]) -> np.ndarray: ...


def load_model(workdir: str | pathlib.Path) -> Model:
    """A trained run, restored as batch prediction restores it."""
    from sentiment_jax import inference

    return inference.load(workdir)


# ---------------------------------------------------------------------------------------
# Suites and the cases generated from them.


def suite_path(name: str) -> pathlib.Path:
    """A suite by language name (a file in sentiment_jax/suites/) or by path."""
    path = pathlib.Path(name)
    if not path.suffix:
        path = SUITES / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in SUITES.glob("*.json"))
        raise FileNotFoundError(f"suite {name} not found; give a JSON file or one of {known}")
    return path


def load_suite(name: str) -> dict:
    """The suite as data, checked so that a mistake in it is one line naming the test."""
    path = suite_path(name)
    try:
        suite = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    for key in ("lexicons", "tests"):
        if key not in suite:
            raise ValueError(f"{path}: no '{key}'; see sentiment_jax/suites/english.json for the shape")
    lexicons, sources = suite["lexicons"], suite.get("sources", {})
    for test in suite["tests"]:
        where = f"{path}: test '{test.get('name')}'"
        if test.get("type") not in KINDS:
            raise ValueError(f"{where}: type must be one of {KINDS}, not {test.get('type')!r}")
        templates = test.get("templates") or sources.get(test.get("source"))
        if not templates:
            raise ValueError(f"{where}: give 'templates' or a 'source' among {sorted(sources)}")
        for t in templates:
            for slot in SLOT.findall(t["text"] + t.get("perturbed", "")):
                if slot not in lexicons:
                    raise ValueError(f"{where}: template '{t['text']}' uses {{{slot}}}, which no lexicon names")
            if test["type"] == "mft" and t.get("label") not in LABELS:
                raise ValueError(f"{where}: label {t.get('label')!r} of '{t['text']}' is not one of {LABELS}")
            if test["type"] == "dir" and (test.get("direction") or t.get("direction")) not in LABELS[:3]:
                raise ValueError(f"{where}: a dir test needs a direction, one of {LABELS[:3]}")
        perturb = test.get("perturb")
        if test["type"] != "mft" and perturb is None and not all("perturbed" in t for t in templates):
            raise ValueError(f"{where}: give 'perturb' or a 'perturbed' template for every template")
        if isinstance(perturb, dict):
            (op, arg), = perturb.items()
            if op not in ("swap", "add", "append") or arg not in lexicons:
                raise ValueError(f"{where}: perturb {perturb} must be {{swap|add|append: LEXICON}}")
            if op == "swap" and any(f"{{{arg}}}" not in t["text"] for t in templates):
                raise ValueError(f"{where}: swaps {{{arg}}}, which a template of it lacks")
        elif perturb is not None and perturb not in PERTURBATIONS:
            raise ValueError(f"{where}: perturb {perturb!r} is not one of {PERTURBATIONS} or a dict")
    suite["path"] = str(path)
    return suite


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def fill(template: str, values: dict[str, str]) -> str:
    return _capitalised(SLOT.sub(lambda m: values[m.group(1)], template))


def sentiment_words(suite: dict) -> set[str]:
    """Every word of the lexicons that carry sentiment, and the protected words (negations, 'but')."""
    words = {w for name in suite.get("sentiment_lexicons", []) for entry in suite["lexicons"][name]
             for w in re.findall(r"[\w']+", entry.lower())}
    return words | {w.lower() for w in suite.get("protected_words", [])}


def _typo(text: str, keep: set[str], rng: random.Random) -> str | None:
    """Two neighbouring letters swapped inside one word of 4+ letters that is not in `keep`."""
    words = [m for m in re.finditer(r"[A-Za-z]{4,}", text) if m.group().lower() not in keep]
    rng.shuffle(words)
    for m in words:
        w = m.group()
        spots = [i for i in range(1, len(w) - 2) if w[i] != w[i + 1]]  # first and last letters stay
        if spots:
            i = rng.choice(spots)
            return text[:m.start()] + w[:i] + w[i + 1] + w[i] + w[i + 2:] + text[m.end():]
    return None


def _punctuation_case(text: str, rng: random.Random) -> str:
    body = text.rstrip(".!?;")
    return rng.choice([body, body + "!", text.lower(), text.upper(), body + "..."])


def _case(test: dict, template: dict, lexicons: dict, keep: set[str], rng: random.Random) -> dict | None:
    values = {slot: rng.choice(lexicons[slot]) for slot in SLOT.findall(template["text"])}
    text = fill(template["text"], values)
    case = {"template": template["text"], "text": text}
    if test["type"] == "mft":
        return {**case, "label": template["label"]}
    perturb = test.get("perturb")
    if "perturbed" in template:
        values.update({s: rng.choice(lexicons[s]) for s in SLOT.findall(template["perturbed"]) if s not in values})
        perturbed = fill(template["perturbed"], values)
    elif perturb == "typo":
        perturbed = _typo(text, keep, rng)
    elif perturb == "punctuation_case":
        perturbed = _punctuation_case(text, rng)
    else:
        (op, arg), = perturb.items()
        if op == "swap":
            others = [v for v in lexicons[arg] if v != values[arg]]
            perturbed = fill(template["text"], {**values, arg: rng.choice(others)}) if others else None
        elif op == "append" or rng.random() < 0.5:
            perturbed = f"{text} {rng.choice(lexicons[arg])}"
        else:
            perturbed = f"{rng.choice(lexicons[arg])} {text}"
    if perturbed is None or perturbed == text:
        return None
    case["perturbed"] = perturbed
    if test["type"] == "dir":
        case["direction"] = template.get("direction") or test["direction"]
    return case


def generate(suite: dict, seed: int = 0, cases_per_test: int | None = None) -> list[dict]:
    """Each test of the suite with its `cases`: distinct, and the same for the same seed."""
    n = cases_per_test or suite.get("cases_per_test", 40)
    keep = sentiment_words(suite)
    tests = []
    for test in suite["tests"]:
        templates = test.get("templates") or suite["sources"][test["source"]]
        rng = random.Random(f"{seed}/{test['capability']}/{test['name']}")
        cases, seen = [], set()
        for _ in range(50 * n):
            if len(cases) == n:
                break
            case = _case(test, rng.choice(templates), suite["lexicons"], keep, rng)
            if case is not None and (case["text"], case.get("perturbed")) not in seen:
                seen.add((case["text"], case.get("perturbed")))
                cases.append(case)
        tests.append({"capability": test["capability"], "name": test["name"], "type": test["type"], "cases": cases})
    return tests


# ---------------------------------------------------------------------------------------
# Scoring a model.


def class_indices(label_names: Sequence[str]) -> dict[str, int]:
    """positive / negative / neutral -> the model's class index, by the first three letters of its names."""
    found = {}
    for label in LABELS[:3]:
        hits = [i for i, name in enumerate(label_names) if name.lower().startswith(label[:3])]
        if len(hits) == 1:
            found[label] = hits[0]
    if "positive" not in found or "negative" not in found:
        raise ValueError(f"class names {list(label_names)} have no positive and negative class (names starting "
                         "pos / neg); pass --class_names to name the model's classes in order")
    return found


def allowed(label: str, classes: dict[str, int]) -> set[int] | None:
    """The classes a label accepts; None when the model cannot express it (neutral on 2 classes)."""
    if label.startswith("not "):
        return {i for name, i in classes.items() if name != label[4:]}
    return {classes[label]} if label in classes else None


@dataclasses.dataclass
class Scored:
    """One run's results: a row per test and the failure rate per capability."""

    name: str
    tests: list[dict]

    @property
    def capabilities(self) -> dict[str, float | None]:
        out = {}
        for capability in dict.fromkeys(t["capability"] for t in self.tests):
            rows = [t for t in self.tests if t["capability"] == capability and t["failure_rate"] is not None]
            cases = sum(t["cases"] for t in rows)
            out[capability] = sum(t["failures"] for t in rows) / cases if cases else None
        return out


def score(model: Model, tests: list[dict], *, name: str = "model", tolerance: float = 0.01,
          class_names: Sequence[str] | None = None) -> Scored:
    """Runs every case through `model.predict` (one call) and counts the failures of each test."""
    classes = class_indices(class_names or model.label_names)
    texts = [text for t in tests for c in t["cases"] for text in (c["text"], c.get("perturbed")) if text is not None]
    unique = list(dict.fromkeys(texts))
    probs = dict(zip(unique, model.predict(unique))) if unique else {}
    names = list(class_names or model.label_names)
    rows = []
    for t in tests:
        failed, applicable = [], 0
        for c in t["cases"]:
            before = probs[c["text"]]
            if t["type"] == "mft":
                ok = allowed(c["label"], classes)
                if ok is None:
                    continue
                fails = int(before.argmax()) not in ok
                detail = {"expected": c["label"], "predicted": names[int(before.argmax())],
                          "probability": float(before.max())}
            else:
                after = probs[c["perturbed"]]
                if t["type"] == "inv":
                    fails = int(before.argmax()) != int(after.argmax())
                    detail = {"predicted": names[int(before.argmax())], "predicted_after": names[int(after.argmax())]}
                else:
                    if c["direction"] not in classes:
                        continue
                    k = classes[c["direction"]]
                    fails = after[k] < before[k] - tolerance
                    detail = {"direction": c["direction"], "p_before": float(before[k]), "p_after": float(after[k])}
            applicable += 1
            if fails:
                failed.append({"text": c["text"], **({"perturbed": c["perturbed"]} if "perturbed" in c else {}),
                               **detail})
        rows.append({"capability": t["capability"], "name": t["name"], "type": t["type"], "cases": applicable,
                     "failures": len(failed), "failure_rate": len(failed) / applicable if applicable else None,
                     "examples": failed[:EXAMPLES]})
    return Scored(name, rows)


# ---------------------------------------------------------------------------------------
# Reports.


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown(results: Sequence[Scored], suite: dict, seed: int) -> str:
    """The capability table, the per-test table (runs side by side) and a few failing examples of each run."""
    head = " | ".join(r.name for r in results)
    caps = list(dict.fromkeys(c for r in results for c in r.capabilities))
    lines = [f"Suite `{pathlib.Path(suite['path']).name}` ({suite.get('language', '?')}), seed {seed}; "
             "failure rate per capability (lower is better; n/a: the model has no such class).", "",
             f"| capability | {head} |", "| --- |" + " ---: |" * len(results)]
    lines += [f"| {c} | " + " | ".join(_rate(r.capabilities.get(c)) for r in results) + " |" for c in caps]
    lines += ["", f"| capability | test | type | cases | {head} |", "| --- | --- | --- | ---: |" + " ---: |" * len(results)]
    keys = list(dict.fromkeys((t["capability"], t["name"], t["type"]) for r in results for t in r.tests))
    for capability, name, kind in keys:
        rows = [next((t for t in r.tests if (t["capability"], t["name"]) == (capability, name)), None) for r in results]
        cases = max((t["cases"] for t in rows if t), default=0)
        lines.append(f"| {capability} | {name} | {kind.upper()} | {cases} | " +
                     " | ".join(_rate(t["failure_rate"]) if t else "–" for t in rows) + " |")
    for r in results:
        lines += ["", f"Failing examples, {r.name}:", ""]
        for t in r.tests:
            for e in t["examples"]:
                lines.append(f"- {t['capability']} / {t['name']}: {_example(e)}")
    return "\n".join(lines) + "\n"


def _example(e: dict) -> str:
    if "expected" in e:
        return f"\"{e['text']}\" expected {e['expected']}, predicted {e['predicted']} ({e['probability']:.2f})"
    if "direction" in e:
        return (f"\"{e['text']}\" → \"{e['perturbed']}\": p({e['direction']}) "
                f"{e['p_before']:.2f} → {e['p_after']:.2f}")
    return f"\"{e['text']}\" ({e['predicted']}) → \"{e['perturbed']}\" ({e['predicted_after']})"


def write(results: Sequence[Scored], tests: list[dict], suite: dict, seed: int, folder: pathlib.Path) -> str:
    """behaviour.json, behaviour.md, behaviour.png and the generated cases (behaviour_cases.jsonl) in `folder`."""
    from sentiment_jax import files, plots

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(results, suite, seed)
    files.write_atomic(folder / "behaviour.md", text)
    files.write_atomic(folder / "behaviour.json", json.dumps(
        {"suite": suite["path"], "language": suite.get("language"), "seed": seed,
         "runs": [{"name": r.name, "capabilities": r.capabilities, "tests": r.tests} for r in results]}, indent=2))
    files.write_atomic(folder / "behaviour_cases.jsonl", "".join(
        json.dumps({"capability": t["capability"], "test": t["name"], "type": t["type"], **c}) + "\n"
        for t in tests for c in t["cases"]))
    plots.failure_rates({r.name: r.capabilities for r in results}, folder / "behaviour.png")
    return text


def suite_for(cfg) -> str:
    """The suite of a run's language: NusaX runs use theirs when the suite exists, everything else english."""
    language = cfg.data.language if cfg.data.name == "nusax_senti" else "english"
    return language if (SUITES / f"{language}.json").is_file() else "english"


def run(workdirs: Sequence[str | pathlib.Path], *, names: Sequence[str] | None = None, suite: str | None = None,
        seed: int = 0, cases_per_test: int | None = None, out: str | pathlib.Path | None = None,
        class_names: Sequence[str] | None = None) -> tuple[list[Scored], str]:
    """Scores each run on its suite and writes its report into its folder; with `out`, all runs side by side
    there. Returns the results and the Markdown of all side by side (headed by the first run's suite)."""
    results = []
    for i, workdir in enumerate(workdirs):
        model = load_model(workdir)
        spec = load_suite(suite or suite_for(model.config))
        tests = generate(spec, seed, cases_per_test)
        result = score(model, tests, name=names[i] if names else pathlib.Path(workdir).name,
                       tolerance=spec.get("tolerance", 0.01), class_names=class_names)
        write([result], tests, spec, seed, pathlib.Path(workdir))
        results.append((result, tests, spec))
    scored = [r for r, _, _ in results]
    _, tests, spec = results[0]
    if out is not None:
        write(scored, tests, spec, seed, pathlib.Path(out))
    return scored, markdown(scored, spec, seed)


def main(argv) -> None:
    from absl import flags, logging

    del argv
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.ERROR)  # orbax warns about read-only managers
    from sentiment_jax import checkpoints
    from sentiment_jax.data import DataError

    try:
        _, text = run(FLAGS.workdir, suite=FLAGS.suite, seed=FLAGS.seed, cases_per_test=FLAGS.cases,
                      out=FLAGS.out, class_names=FLAGS.class_names)
    except (DataError, checkpoints.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_multi_string("workdir", None, "A trained run (repeat for several, scored side by side).",
                              required=True)
    flags.DEFINE_string("suite", None, "A suite: a language in sentiment_jax/suites/ or a JSON file "
                        "(default: the run's language, else english).")
    flags.DEFINE_integer("seed", 0, "Seed of the generated cases.")
    flags.DEFINE_integer("cases", None, "Cases per test (default: the suite's cases_per_test).")
    flags.DEFINE_string("out", None, "Also write all runs side by side into this folder.")
    flags.DEFINE_list("class_names", None, "The model's classes in logit order as positive/negative/neutral, "
                      "when its own names do not start with pos / neg / neu.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
