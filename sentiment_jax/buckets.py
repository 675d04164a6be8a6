"""Fixed (batch, length) shape buckets, so a compiled forward pass sees only a few shapes.

Texts go to the smallest length bucket that holds them, in batches of at most the largest
batch bucket, each padded to the smallest batch bucket that holds it: a jitted step (a run)
or an exported program compiles once per bucket (`warmup`) and never again, whatever the texts.
Shared by `inference.Predictor` and `exported.ExportedPredictor`; imports NumPy only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# Powers of two: merged requests waste at most half a batch on padding (with 1, 8, 32 a
# group of 2 texts costs a batch of 8); the price is more compilations at start-up.
BATCH_SIZES = (1, 2, 4, 8, 16, 32)

# run(inputs, width, rows) -> probabilities [len(inputs), K] of the inputs padded to [rows, width].
Runner = Callable[[list, int, int], np.ndarray]


def length_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest` up to the run's max_length: 400 -> (32, 64, 128, 256, 400)."""
    buckets = []
    while smallest < max_length:
        buckets.append(smallest)
        smallest *= 2
    return (*buckets, max_length)


def predict(inputs: Sequence, sizes: Sequence[int], lengths: Sequence[int], batch_sizes: Sequence[int],
            num_classes: int, run: Runner) -> np.ndarray:
    """Probabilities [N, K] of N per-text inputs of `sizes` (their lengths, cut at the largest bucket)."""
    tokens = np.minimum(np.asarray(sizes, np.int64), lengths[-1])
    widths = np.asarray(lengths)[np.searchsorted(lengths, tokens)]  # smallest bucket that fits
    out = np.zeros((len(inputs), num_classes), np.float32)
    largest = batch_sizes[-1]
    for width in np.unique(widths):
        rows = np.flatnonzero(widths == width)
        for start in range(0, len(rows), largest):
            chunk = rows[start:start + largest]
            size = next(b for b in batch_sizes if b >= len(chunk))
            out[chunk] = run([inputs[i] for i in chunk], int(width), size)
    return out


def warmup(lengths: Sequence[int], batch_sizes: Sequence[int], run: Runner, empty) -> None:
    """Runs every (batch, length) bucket once on `empty` inputs, compiling each now rather than on a request."""
    for width in lengths:
        for size in batch_sizes:
            run([empty] * size, width, size)


def records(label_names: Sequence[str], probs: np.ndarray) -> list[dict]:
    """One {"label", "probabilities": {class name: p}} per row."""
    return [{"label": label_names[int(p.argmax())],
             "probabilities": {n: float(v) for n, v in zip(label_names, p)}} for p in probs]
