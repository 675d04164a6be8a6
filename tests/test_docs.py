"""Docs, code, comments and configs speak of the project, not of how its work was organised."""

import re

from conftest import REPO

FOLDERS = ("docs", "sentiment_jax", "configs", "benchmarks", "launch", "tests", "notebooks", ".ci")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".md", ".sh", ".sbatch", ".ipynb", ".toml", ".cfg", ".txt", ".yaml", ".yml", ""}

# Work-log words: who ran what, when, on which branch or machine.
WORK_LOG = re.compile(
    r"\b(first|second|third|fourth|fifth|sixth|previous|this|last|next|earlier|later) sessions?\b"
    r"|\bsessions? \d|\bthe lead\b|\blead's\b|\bhelper's\b|\bhelpers'|\b(a|another|two|the) helpers?\b(?! (function|module))"
    r"|\bhelper probe\b|\bengineers?'?s?\b|\bworktrees?\b|/work/|\bwt-\w|`\w+` branch\b|\bbranch `"
    r"|\b(zoo2|verb2|bilstm3|bilstm4|nusax3|nusax4|id5)\b|\b20\d\d-[01]\d-[0-3]\d\b|\d\d:\d\d UTC\b",
    re.IGNORECASE)
# Legitimate uses of such words, allowed by name.
ALLOWED = (
    'scope="session"',  # pytest fixtures shared by a whole test run
    "requests.Session", "httpx.Client",  # HTTP sessions
)


def project_files():
    for name in TOP_FILES:
        if (REPO / name).is_file():
            yield REPO / name
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                yield path


def test_docs_and_code_hold_no_work_log_words():
    this = REPO / "tests" / "test_docs.py"
    found = []
    for path in project_files():
        if path == this:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            text = line
            for allowed in ALLOWED:
                text = text.replace(allowed, "")
            match = WORK_LOG.search(text)
            if match:
                found.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)!r} in {line.strip()[:100]}")
    assert not found, "work-log words (rewrite to speak of the project):\n" + "\n".join(found)


def test_the_pattern_catches_work_log_lines_and_passes_project_lines():
    caught = ["Fifth session: embeddings from word2vec", "the lead's benchmarks ran beside it",
              "beside two helpers' training jobs", "branch `verb2`", "2026-11-24 06:55 UTC",
              "PYTHONPATH=/work/main python", "another engineer's IMDB training", "(`id5` branch)"]
    passed = ["a helper function for the tests", "dropout on both residual branches",
              "@pytest.fixture(scope=\"session\")", "pip install 'sentiment_jax[wandb]'",
              "this would lead to a bigger batch", "the 12-language sweep"]
    assert all(WORK_LOG.search(line) for line in caught), [l for l in caught if not WORK_LOG.search(l)]
    assert not any(WORK_LOG.search(line.replace('scope="session"', "")) for line in passed)
