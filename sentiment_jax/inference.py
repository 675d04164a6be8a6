"""Load a trained run and predict texts: the one inference path behind the CLI and the server.

A run's workdir holds all it needs (see runs.py); `runs.load` restores it. Texts are padded
into a few fixed (batch, length) buckets, so the jitted predict step compiles once per bucket (`warmup`) and never again, whatever the texts.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import ml_collections
import numpy as np

from sentiment_jax import runs, sharding

# Powers of two: merged requests waste at most half a batch on padding (with 1, 8, 32 a
# group of 2 texts costs a batch of 8); the price is more compilations at start-up.
BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def length_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest` up to the run's max_length: 400 -> (32, 64, 128, 256, 400)."""
    buckets = []
    while smallest < max_length:
        buckets.append(smallest)
        smallest *= 2
    return (*buckets, max_length)


@dataclasses.dataclass
class Predictor:
    """A restored run (`runs.Run`): texts -> class probabilities, in fixed shape buckets."""

    name: str
    run: runs.Run
    batch_sizes: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def workdir(self) -> pathlib.Path:
        return self.run.workdir

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.run.cfg

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.run.label_names

    @property
    def checkpoint_step(self) -> int:
        return self.run.step

    @property
    def _predict_step(self):
        return self.run.predict_step

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities [N, K], in the order of `texts`."""
        seqs = self.run.encoder.encode(texts)
        tokens = np.minimum([len(s) for s in seqs], self.lengths[-1])
        widths = np.asarray(self.lengths)[np.searchsorted(self.lengths, tokens)]  # smallest bucket that fits
        out = np.zeros((len(seqs), len(self.label_names)), np.float32)
        largest = self.batch_sizes[-1]
        for width in np.unique(widths):
            rows = np.flatnonzero(widths == width)
            for start in range(0, len(rows), largest):
                chunk = rows[start:start + largest]
                out[chunk] = self._run([seqs[i] for i in chunk], int(width))
        return out

    def _run(self, seqs: list[np.ndarray], width: int) -> np.ndarray:
        """One call of the jitted step on the smallest batch bucket that holds `seqs`."""
        size = next(b for b in self.batch_sizes if b >= len(seqs))
        ids, mask = self.run.pad(seqs, width, rows=size)  # masks built exactly as in training and eval
        arrays = sharding.put_batch({"ids": ids, "mask": mask}, self.run.batch_sharding)
        probs = self.run.predict_step(self.run.params, self.run.rest, arrays["ids"], arrays["mask"])
        return np.asarray(probs)[:len(seqs)]

    def warmup(self) -> None:
        """Compiles every (batch, length) bucket now rather than on the first requests."""
        empty = np.zeros(0, np.float32 if self.run.encoder.kind == "backbone_features" else np.int32)
        for width in self.lengths:
            for size in self.batch_sizes:
                self._run([empty] * size, width)

    def records(self, probs: np.ndarray) -> list[dict]:
        """One {"label", "probabilities": {class name: p}} per row."""
        return [{"label": self.label_names[int(p.argmax())],
                 "probabilities": {n: float(v) for n, v in zip(self.label_names, p)}} for p in probs]


def load(workdir: str | pathlib.Path, *, name: str | None = None, checkpoint: str | int = "best",
         batch_sizes: Sequence[int] = BATCH_SIZES) -> Predictor:
    """Restores one checkpoint's parameters ('best', 'latest' or a step) onto the current devices."""
    run = runs.load(workdir, checkpoint)
    # Every batch bucket must split evenly over the data-parallel devices.
    shards = run.data_shards
    sizes = tuple(sorted({-(-b // shards) * shards for b in batch_sizes}))
    fixed = run.encoder.kind == "backbone_features"  # one feature vector per text: one width
    lengths = (run.max_length,) if fixed else length_buckets(run.max_length)
    return Predictor(name=name or run.workdir.name, run=run, batch_sizes=sizes, lengths=lengths)
