"""The behavioural suite: its generated cases, a hand-built model whose behaviour is known, a tiny trained run."""

import collections
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from sentiment_jax import behaviour

SUITES = ("english", "indonesian")
# What the hand-built model needs to know of each language beyond the suite's lexicons.
RULES = {
    "english": {"positive": ("pos_adj", "pos_verb", "pos_verb_past"), "negative": ("neg_adj", "neg_verb", "neg_verb_past"),
                "negators": {"not", "never", "didn't", "don't"}, "breaks": {"but", "now"}},
    "indonesian": {"positive": ("pos_adj", "pos_feel"), "negative": ("neg_adj", "neg_feel"),
                   "negators": {"tidak"}, "breaks": {"tapi", "tetapi", "sekarang"}},
}


class LexiconModel:
    """Counts the suite's sentiment words in the last clause that has any; a negator earlier in the clause
    flips a word, an intensifier before it doubles it and a diminisher halves it. Text without sentiment
    words is neutral (with 3 classes)."""

    def __init__(self, suite: dict, label_names, negation: bool = True):
        rules, lex = RULES[suite["language"]], suite["lexicons"]
        self.label_names = label_names
        self.polarity = {w: s for s, names in ((1, rules["positive"]), (-1, rules["negative"]))
                         for name in names for w in lex[name]}
        self.weight = {**{w: 2.0 for w in lex["intensifier"] + lex.get("verb_intensifier", [])},
                       **{w: 0.5 for w in lex["diminisher"]}}
        self.negators = rules["negators"] if negation else set()
        self.breaks = rules["breaks"]

    def score(self, text: str) -> float:
        clauses = [[]]
        for token in re.findall(r"[\w'-]+|[.,;!?]", text.lower()):
            if token in self.breaks or not re.match(r"[\w'-]", token):
                clauses.append([])
            else:
                clauses[-1].append(token)
        for clause in reversed(clauses):
            total, negated, seen = 0.0, False, False
            for i, token in enumerate(clause):
                negated |= token in self.negators
                if token in self.polarity:
                    seen = True
                    total += self.polarity[token] * self.weight.get(clause[i - 1] if i else "", 1.0) * (-1 if negated else 1)
            if seen:
                return total
        return 0.0

    def predict(self, texts):
        s = np.array([self.score(t) for t in texts])
        logits = (np.stack([-s, 0.4 - np.abs(s), s], -1) if len(self.label_names) == 3 else np.stack([-s, s], -1))
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def suites():
    return {name: behaviour.load_suite(name) for name in SUITES}


def template_pattern(template: str, lexicons: dict) -> re.Pattern:
    """A template as a regex whose slots match only their lexicon's entries (first letter as capitalised)."""
    parts = re.split(r"(\{\w+\})", template)
    body = "".join("(" + "|".join(re.escape(v) for v in lexicons[p[1:-1]]) + ")" if p.startswith("{") else
                   re.escape(p) for p in parts)
    return re.compile(body, re.IGNORECASE)


def sentiment_bag(text: str, words: set[str]) -> collections.Counter:
    return collections.Counter(w for w in re.findall(r"[\w'-]+", text.lower()) if w in words)


@pytest.mark.parametrize("language", SUITES)
def test_cases_are_deterministic_distinct_and_filled_from_their_templates(suites, language):
    suite = suites[language]
    tests = behaviour.generate(suite, seed=0)
    assert tests == behaviour.generate(suite, seed=0)
    assert tests != behaviour.generate(suite, seed=1)
    assert len(tests) == len(suite["tests"])
    for t in tests:
        assert len(t["cases"]) == suite["cases_per_test"], t["name"]
        assert len({(c["text"], c.get("perturbed")) for c in t["cases"]}) == len(t["cases"])
        for c in t["cases"]:
            assert template_pattern(c["template"], suite["lexicons"]).fullmatch(c["text"]), c
            assert c["text"][0] == c["text"][0].upper()
    # A test's cases do not depend on the tests before it.
    shorter = {**suite, "tests": suite["tests"][3:]}
    assert behaviour.generate(shorter, seed=0) == tests[3:]


@pytest.mark.parametrize("language", SUITES)
def test_invariance_cases_keep_what_decides_the_label(suites, language):
    """Read against the templates: the perturbed text keeps every sentiment-bearing and protected word,
    a swap changes only its slot, an added sentence is a neutral one."""
    suite = suites[language]
    lex = suite["lexicons"]
    keep = {w.lower() for name in suite["sentiment_lexicons"] if not name.endswith("_sentence")
            for w in lex[name]} | set(suite["protected_words"])
    specs = {t["name"]: t for t in suite["tests"]}
    for t in behaviour.generate(suite, seed=3):
        if t["type"] != "inv":
            continue
        perturb = specs[t["name"]]["perturb"]
        for c in t["cases"][::4]:
            text, perturbed = c["text"], c["perturbed"]
            assert sentiment_bag(text, keep) == sentiment_bag(perturbed, keep), (text, perturbed)
            if perturb == "typo":
                a, b = text.split(), perturbed.split()
                changed = [(x, y) for x, y in zip(a, b) if x != y]
                assert len(a) == len(b) and len(changed) == 1 and sorted(changed[0][0]) == sorted(changed[0][1])
            elif perturb == "punctuation_case":
                strip = lambda s: re.sub(r"[.!?;]+$", "", s.lower())
                assert strip(text) == strip(perturbed)
            elif "swap" in perturb:
                slot = perturb["swap"]
                before = template_pattern(c["template"], lex).fullmatch(text)
                after = template_pattern(c["template"], lex).fullmatch(perturbed)
                slots = re.findall(r"\{(\w+)\}", c["template"])
                diff = [s for s, x, y in zip(slots, before.groups(), after.groups()) if x != y]
                assert diff == [slot], (text, perturbed)
            else:
                extra = perturbed.replace(text, "").strip()
                assert extra in lex[perturb["add"]], (text, perturbed)


@pytest.mark.parametrize("language", SUITES)
@pytest.mark.parametrize("label_names", [("neg", "pos"), ("negative", "neutral", "positive")])
def test_a_rule_model_passes_what_it_implements_and_fails_only_negation_without_its_rule(suites, language,
                                                                                         label_names):
    suite = suites[language]
    tests = behaviour.generate(suite, seed=0)
    full = behaviour.score(LexiconModel(suite, label_names), tests, tolerance=suite["tolerance"])
    for row in full.tests:
        if row["failure_rate"] is not None:
            assert row["failures"] == 0, (row["name"], row["examples"])
    neutral = next(r for r in full.tests if r["capability"] == "neutral")
    assert (neutral["failure_rate"] is None) == (len(label_names) == 2)
    assert full.capabilities["neutral"] == (None if len(label_names) == 2 else 0.0)

    blind = behaviour.score(LexiconModel(suite, label_names, negation=False), tests, tolerance=suite["tolerance"])
    failing = {r["name"]: r["failure_rate"] for r in blind.tests if r["failures"]}
    assert failing == {"negated positive": 1.0, "negated negative": 1.0}
    assert len(next(r for r in blind.tests if r["name"] == "negated positive")["examples"]) == behaviour.EXAMPLES


def test_the_suite_on_a_tiny_trained_run(trained_runs, predictors, tmp_path):
    """Every capability is scored, and the counts agree with the run's own predictions of the written cases."""
    results, text = behaviour.run([trained_runs["lstm"], trained_runs["gru"]], suite="english", out=tmp_path,
                                  cases_per_test=12)
    report = json.loads((trained_runs["lstm"] / "behaviour.json").read_text())
    capabilities = {t["capability"] for t in behaviour.load_suite("english")["tests"]}
    assert set(report["runs"][0]["capabilities"]) == capabilities
    assert report["runs"][0]["capabilities"]["neutral"] is None  # the run has 2 classes
    assert results[1].capabilities["neutral"] is not None  # the GRU has 3
    cases = [json.loads(line) for line in (trained_runs["lstm"] / "behaviour_cases.jsonl").read_text().splitlines()]
    predictor, tolerance = predictors["lstm"], behaviour.load_suite("english")["tolerance"]
    for row in report["runs"][0]["tests"]:
        mine = [c for c in cases if c["test"] == row["name"]]
        before = predictor.predict([c["text"] for c in mine])
        if row["type"] == "mft":
            if row["capability"] == "neutral":
                continue
            wanted = [{"positive": {1}, "negative": {0}, "not positive": {0}, "not negative": {1}}[c["label"]]
                      for c in mine]
            failures = sum(int(p.argmax()) not in w for p, w in zip(before, wanted))
        else:
            after = predictor.predict([c["perturbed"] for c in mine])
            if row["type"] == "inv":
                failures = int(np.sum(before.argmax(-1) != after.argmax(-1)))
            else:
                k = np.array([1 if c["direction"] == "positive" else 0 for c in mine])
                rows = np.arange(len(mine))
                failures = int(np.sum(after[rows, k] < before[rows, k] - tolerance))
        assert row["failures"] == failures, row["name"]
    for folder in (trained_runs["lstm"], tmp_path):
        assert (folder / "behaviour.png").stat().st_size > 5000
        assert "| negation |" in (folder / "behaviour.md").read_text()
    assert f"| capability | {trained_runs['lstm'].name} | {trained_runs['gru'].name} |" in text


def test_suite_mistakes_are_one_line(tmp_path, suites):
    bad = dict(suites["english"])
    bad["tests"] = [{"capability": "x", "name": "broken", "type": "mft",
                     "templates": [{"text": "The {thingy} is {pos_adj}.", "label": "positive"}]}]
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"test 'broken': template 'The \{thingy\} is \{pos_adj\}.' uses \{thingy\}"):
        behaviour.load_suite(str(file))
    with pytest.raises(FileNotFoundError, match=r"suite klingon not found; give a JSON file or one of \['english'"):
        behaviour.load_suite("klingon")
    with pytest.raises(ValueError, match="no positive and negative class"):
        behaviour.class_indices(["0", "1"])
    run = subprocess.run([sys.executable, "-m", "sentiment_jax.behaviour", f"--workdir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip() == f"error: no checkpoints in {tmp_path}; train first or fix the workdir"
