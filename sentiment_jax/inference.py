"""Load a trained run and predict texts: the one inference path behind the CLI and the server.

A run's workdir holds all it needs: config.json, the tokenizer, labels.json and checkpoints.
Texts are padded into a few fixed (batch, length) buckets, so the jitted predict step
compiles once per bucket (`warmup`) and never again, whatever the texts.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import ml_collections
import numpy as np

from sentiment_jax import checkpoints, input_pipeline, sharding, tokenization, train

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
    """A restored run: texts -> class probabilities."""

    name: str
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    label_names: tuple[str, ...]
    checkpoint_step: int
    tokenizer: Any
    batch_sizes: tuple[int, ...]
    lengths: tuple[int, ...]
    _predict_step: Any
    _params: Any
    _rest: Any
    _batch_sharding: Any

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities [N, K], in the order of `texts`."""
        seqs = self.tokenizer.encode(texts)
        tokens = np.minimum([len(s) for s in seqs], self.config.data.max_length)
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
        d = self.config.data
        ids, lengths = tokenization.pad(seqs, width, d.padding, d.truncation)
        split = input_pipeline.Encoded(ids, lengths, np.zeros(len(seqs), np.int32))
        batches = input_pipeline.Batches(split, size, padding=d.padding, shuffle=False)
        batch = batches.batch(batches.order(0)[0])  # masks built exactly as in training and eval
        arrays = sharding.put_batch({"ids": batch["ids"], "mask": batch["mask"]}, self._batch_sharding)
        probs = self._predict_step(self._params, self._rest, arrays["ids"], arrays["mask"])
        return np.asarray(probs)[:len(seqs)]

    def warmup(self) -> None:
        """Compiles every (batch, length) bucket now rather than on the first requests."""
        empty = np.zeros(0, np.int32)
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
    workdir = pathlib.Path(workdir)
    cfg = train.load_config(workdir)
    tokenizer = tokenization.load(workdir)
    label_names = train.load_labels(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise checkpoints.CheckpointError(f"no checkpoints in {workdir}; train first or fix the workdir")
    mesh = sharding.make_mesh(cfg.mesh)
    state, setup = train.create_state(cfg, mesh, tokenizer.vocab_size, len(label_names), total_steps=1)
    mngr = checkpoints.manager(workdir, cfg.checkpoint, read_only=True)
    try:
        step = checkpoints.resolve_step(mngr, checkpoint)
        model = checkpoints.restore(mngr, step, model=checkpoints.abstract(train.model_item(state)))["model"]
    finally:
        mngr.close()
    # Every batch bucket must split evenly over the data-parallel devices.
    shards = int(np.prod([mesh.shape[a] for a in cfg.mesh.data_axes]))
    sizes = tuple(sorted({-(-b // shards) * shards for b in batch_sizes}))
    predict_step = train.make_predict_step(setup, setup.state_sharding.params, setup.state_sharding.rest)
    return Predictor(name=name or workdir.name, workdir=workdir, config=cfg, label_names=label_names,
                     checkpoint_step=int(step), tokenizer=tokenizer, batch_sizes=sizes,
                     lengths=length_buckets(cfg.data.max_length), _predict_step=predict_step,
                     _params=model["params"], _rest=model["rest"], _batch_sharding=setup.batch_sharding)
