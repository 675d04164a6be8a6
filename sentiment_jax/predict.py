"""Batch prediction: texts in, one JSON line per text out (`--mode=predict` of main.py).

Input is the texts given as arguments, else a file (`.csv` or `.jsonl` with a text field,
anything else one text per line, blank lines skipped), else stdin (one text per line).
Texts are read and predicted in chunks, so an input of any size streams through.
"""

from __future__ import annotations

import csv
import itertools
import json
import pathlib
import sys
from typing import IO, Iterable, Iterator

from sentiment_jax import exported
from sentiment_jax.data import DataError

CHUNK = 256


def _lines(stream: IO[str]) -> Iterator[str]:
    for line in stream:
        if line.strip():
            yield line.rstrip("\r\n")


def _field(row, field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object per line")
    text = row.get(field)
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: no text in field '{field}'; set --text_field to the right column/key")
    return text


def _csv(stream: IO[str], field: str, name: str) -> Iterator[str]:
    reader = csv.DictReader(stream)
    for row in reader:
        yield _field(row, field, f"{name}:{reader.line_num}")


def _jsonl(stream: IO[str], field: str, name: str) -> Iterator[str]:
    for n, line in enumerate(stream, start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
            yield _field(row, field, f"{name}:{n}")


def read_texts(path: str | None, text_field: str = "text") -> Iterator[str]:
    """Texts from a file, or from stdin when `path` is None or '-'."""
    if path in (None, "-"):
        yield from _lines(sys.stdin)
        return
    file = pathlib.Path(path)
    if not file.is_file():
        raise DataError(f"{file}: file not found; check --input")
    suffix = file.suffix.lower()
    try:
        with open(file, encoding="utf-8", newline="" if suffix == ".csv" else None) as stream:
            if suffix == ".csv":
                yield from _csv(stream, text_field, str(file))
            elif suffix in (".jsonl", ".ndjson"):
                yield from _jsonl(stream, text_field, str(file))
            else:
                yield from _lines(stream)
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not valid UTF-8 ({e.reason}); re-encode the file as UTF-8") from None


def predict(workdir: pathlib.Path, texts: Iterable[str], *, checkpoint: str = "best",
            out: IO[str] = sys.stdout) -> int:
    """Writes {"model", "label", "probabilities"} per text; returns how many. `workdir`: a run or an export."""
    texts = iter(texts)
    chunk = list(itertools.islice(texts, CHUNK))  # bad input fails before the model loads
    predictor = exported.load_predictor(workdir, checkpoint=checkpoint)
    count = 0
    while chunk:
        for record in predictor.records(predictor.predict(chunk)):
            out.write(json.dumps({"model": predictor.name, **record}) + "\n")
        out.flush()
        count += len(chunk)
        chunk = list(itertools.islice(texts, CHUNK))
    return count
