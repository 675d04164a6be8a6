"""Load a trained run and predict texts: the one inference path behind the CLI and the server.

A run's workdir holds all it needs (see runs.py); `runs.load` restores it. Texts are padded
into a few fixed (batch, length) buckets (buckets.py), so the jitted predict step compiles once per bucket
(`warmup`) and never again, whatever the texts.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import ml_collections
import numpy as np

from sentiment_jax import buckets, runs, sharding
from sentiment_jax.buckets import BATCH_SIZES, length_buckets


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

    @property
    def kind(self) -> str:
        return self.run.cfg.model.name

    @property
    def metrics(self) -> dict | None:
        """The run's test report (result.json), if it finished."""
        return runs.read_result(self.run.workdir)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities [N, K], in the order of `texts`."""
        seqs = self.run.encoder.encode(texts)
        return buckets.predict(seqs, [len(s) for s in seqs], self.lengths, self.batch_sizes, len(self.label_names),
                               self._run)

    def _run(self, seqs: list[np.ndarray], width: int, rows: int) -> np.ndarray:
        """One call of the jitted step on `rows` rows."""
        ids, mask = self.run.pad(seqs, width, rows=rows)  # masks built exactly as in training and eval
        arrays = sharding.put_batch({"ids": ids, "mask": mask}, self.run.batch_sharding)
        probs = self.run.predict_step(self.run.params, self.run.rest, arrays["ids"], arrays["mask"])
        return np.asarray(probs)[:len(seqs)]

    def warmup(self) -> None:
        """Compiles every (batch, length) bucket now rather than on the first requests."""
        if hasattr(self.run.encoder, "warmup"):  # a backbone featurizer compiles its extraction too
            self.run.encoder.warmup()
        empty = np.zeros(0, np.float32 if self.run.encoder.kind == "backbone_features" else np.int32)
        buckets.warmup(self.lengths, self.batch_sizes, self._run, empty)

    def records(self, probs: np.ndarray) -> list[dict]:
        return buckets.records(self.label_names, probs)


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
