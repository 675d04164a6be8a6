"""An exported run (written by `sentiment_jax.export`): texts -> class probabilities with JAX, NumPy and the tokenizer.

The folder holds the forward pass as serialized StableHLO, one `jax.export` program per
length bucket with a symbolic batch dimension, the parameters as safetensors (arguments of
the programs), the tokenizer, the labels and `manifest.json`. Loading it imports none of the
training code, optax, Orbax or Flax (it needs the `export` extra: safetensors, flatbuffers),
so a folder serves wherever JAX runs, without the run's checkpoints. `ExportedPredictor` answers like `inference.Predictor`, so the predict CLI and
the server take either.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import jax
import numpy as np

from sentiment_jax import buckets, input_pipeline, tokenization
from sentiment_jax._extras import require

MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
ENCODER = "encoder.json"  # the tokenizer, as a run keeps it (runs.ENCODER_FILE)
FORMAT = "sentiment_jax.export"
VERSION = 1


class ExportError(ValueError):
    """A missing or unreadable export folder, phrased as one line with the fix."""


def is_export(path: str | pathlib.Path) -> bool:
    """Whether `path` is an export folder (it has a manifest) rather than a training run."""
    return (pathlib.Path(path) / MANIFEST).is_file()


def program_file(length: int) -> str:
    return f"forward_{length}.jaxexport"


class TokenInputs:
    """A token model's inputs: ids and mask [batch, length], padded and truncated as in training."""

    empty = np.zeros(0, np.int32)

    def __init__(self, tokenizer, spec: dict):
        self.tokenizer, self.padding, self.truncation = tokenizer, spec["padding"], spec["truncation"]

    def encode(self, texts: Sequence[str]) -> tuple[list[np.ndarray], list[int]]:
        """Per text its ids, and their number (what picks the length bucket)."""
        seqs = self.tokenizer.encode(texts)
        return seqs, [len(s) for s in seqs]

    def pad(self, seqs: list[np.ndarray], width: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        return input_pipeline.pad_batch(seqs, width, rows, padding=self.padding, truncation=self.truncation)


class WindowInputs:
    """A frozen backbone's inputs: ids and mask [batch, windows, length], per text its windows of word
    pieces each followed by the template (`tokenization.encode_windows`), padded after the ids as the
    feature extraction pads them. The program pools each window and averages them, as training did."""

    empty = ()  # a text without windows: rows of padding

    def __init__(self, tokenizer, spec: dict):
        self.tokenizer, self.template, self.windows = tokenizer, spec["template"], spec["windows"]
        self.max_length, self.truncation = spec["max_length"], spec["truncation"]

    def encode(self, texts: Sequence[str]) -> tuple[list[list[np.ndarray]], list[int]]:
        """Per text its windows, and the longest one's length (what picks the length bucket)."""
        rows, owner = tokenization.encode_windows(self.tokenizer, texts, self.template, self.max_length,
                                                  self.windows, self.truncation)
        per_text = [[] for _ in texts]
        for row, i in zip(rows, owner):
            per_text[i].append(row)
        return per_text, [max(len(r) for r in windows) for windows in per_text]

    def pad(self, texts: list[list[np.ndarray]], width: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        none = np.zeros(0, np.int32)
        flat = [w for windows in texts for w in [*windows, *[none] * (self.windows - len(windows))]]
        flat += [none] * ((rows - len(texts)) * self.windows)
        ids, mask = input_pipeline.pad_batch(flat, width, len(flat), padding="post", truncation="post")
        shape = (rows, self.windows, width)
        return ids.reshape(shape), mask.reshape(shape)


INPUTS = {"tokens": TokenInputs, "windows": WindowInputs}


class ExportedPredictor:
    """An export folder loaded onto the default device: texts -> class probabilities."""

    def __init__(self, folder: pathlib.Path, manifest: dict, inputs, programs: dict[int, jax.export.Exported],
                 weights: dict[str, jax.Array], name: str, batch_sizes: Sequence[int]):
        self.folder, self.manifest, self.inputs, self.name = folder, manifest, inputs, name
        self.kind = manifest["model"]["name"]
        self.label_names = tuple(manifest["labels"])
        self.checkpoint_step = int(manifest["checkpoint_step"])
        self.metrics = manifest.get("metrics")
        self.lengths = tuple(sorted(programs))
        self.batch_sizes = tuple(sorted(batch_sizes))
        self._programs = {length: jax.jit(p.call) for length, p in programs.items()}
        self._weights = weights

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities [N, K], in the order of `texts`."""
        inputs, sizes = self.inputs.encode(texts)
        return buckets.predict(inputs, sizes, self.lengths, self.batch_sizes, len(self.label_names), self._run)

    def _run(self, inputs: list, width: int, rows: int) -> np.ndarray:
        ids, mask = self.inputs.pad(inputs, width, rows)
        return np.asarray(self._programs[width](self._weights, ids, mask))[:len(inputs)]

    def warmup(self) -> None:
        """Compiles every (batch, length) bucket now rather than on the first requests."""
        buckets.warmup(self.lengths, self.batch_sizes, self._run, self.inputs.empty)

    def records(self, probs: np.ndarray) -> list[dict]:
        return buckets.records(self.label_names, probs)


def _file(folder: pathlib.Path, name: str) -> pathlib.Path:
    file = folder / name
    if not file.is_file():
        raise ExportError(f"{file} not found; the export is incomplete, export the run again")
    return file


def _json(folder: pathlib.Path, name: str):
    file = _file(folder, name)
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ExportError(f"{file} is not valid JSON; export the run again") from None


def read_manifest(folder: pathlib.Path) -> dict:
    if not (folder / MANIFEST).is_file():
        raise ExportError(f"{folder / MANIFEST} not found; is {folder} a folder written by "
                          "`python -m sentiment_jax.export`?")
    manifest = _json(folder, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{folder / MANIFEST} is not a sentiment_jax export manifest; export the run again")
    if manifest.get("version") != VERSION:
        raise ExportError(f"{folder / MANIFEST} has export format version {manifest.get('version')}, this code "
                          f"reads {VERSION}; export the run again with this version")
    return manifest


def _program(folder: pathlib.Path, length: int) -> jax.export.Exported:
    file = _file(folder, program_file(length))
    require("flatbuffers", "export")  # what jax.export reads programs with
    try:
        program = jax.export.deserialize(bytearray(file.read_bytes()))
    except Exception:  # noqa: BLE001 - flatbuffers raise anything on a damaged file
        raise ExportError(f"{file} is not a readable jax.export program; export the run again") from None
    if jax.default_backend() not in program.platforms:
        raise ExportError(f"{file} was exported for {', '.join(program.platforms)}, not {jax.default_backend()}; "
                          f"export again with --platforms={jax.default_backend()}")
    return program


def _weights(folder: pathlib.Path, program: jax.export.Exported) -> dict[str, jax.Array]:
    """The parameters, checked against the argument the program was exported for."""
    safetensors = require("safetensors.numpy", "export")
    file = _file(folder, PARAMS)
    try:
        arrays = safetensors.load_file(file)
    except (require("safetensors", "export").SafetensorError, OSError):
        raise ExportError(f"{file} is not a readable safetensors file; export the run again") from None
    (expected, *_), _ = jax.tree.unflatten(program.in_tree, program.in_avals)
    got = {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}
    want = {k: (tuple(v.shape), str(v.dtype)) for k, v in expected.items()}
    if got != want:
        wrong = sorted(set(got.items()) ^ set(want.items()))[0][0]
        raise ExportError(f"{file} does not hold the parameters the program takes (first difference: '{wrong}'); "
                          "export the run again")
    return jax.device_put(arrays)


def load(folder: str | pathlib.Path, *, name: str | None = None,
         batch_sizes: Sequence[int] | None = None) -> ExportedPredictor:
    """Reads an export folder; `batch_sizes` default to the batch buckets of the exporting version."""
    folder = pathlib.Path(folder)
    manifest = read_manifest(folder)
    try:
        spec = manifest["inputs"]
        inputs = INPUTS[spec["kind"]](tokenization.from_spec(_json(folder, ENCODER), folder), spec)
        programs = {int(length): _program(folder, int(length)) for length in spec["lengths"]}
        weights = _weights(folder, programs[max(programs)])
        return ExportedPredictor(folder, manifest, inputs, programs, weights, name or folder.name,
                                 batch_sizes or spec["batch_sizes"])
    except (KeyError, TypeError) as e:
        raise ExportError(f"{folder}: its {MANIFEST} or {ENCODER} lacks or garbles {e}; export the run again") from None


def load_predictor(path: str | pathlib.Path, *, name: str | None = None, checkpoint: str | int = "best",
                   batch_sizes: Sequence[int] | None = None):
    """What the predict CLI and the server load: an export folder (it has a manifest) or a trained run.

    Only a run imports the training code; an export holds the one checkpoint it was exported from.
    """
    if is_export(path):
        return load(path, name=name, batch_sizes=batch_sizes)
    from sentiment_jax import inference

    return inference.load(path, name=name, checkpoint=checkpoint, batch_sizes=batch_sizes or buckets.BATCH_SIZES)
