"""Token arrays and deterministic, resumable, length-bucketed batches.

The batch order is a pure function of (seed, epoch), so the iterator state is just
(epoch, batch index): a resumed run sees exactly the batches an uninterrupted run would,
and every process of a multi-host run can compute the same global order and take its own
rows. (Our data fits in memory as int32 arrays, so a few lines of NumPy replace a data
loader framework here.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import jax
import numpy as np
from tqdm import tqdm

from sentiment_jax import data as data_lib
from sentiment_jax import files
from sentiment_jax import tokenization


@dataclasses.dataclass
class Encoded:
    """One split as padded ids [N, L] (pad 0), true lengths [N] and labels [N]."""

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


PROGRESS_FROM = 10_000  # texts; smaller splits encode in a second or two, without a bar
CHUNK = 2_000


def encode(split: data_lib.Split, tokenizer, cfg, desc: str | None = None) -> Encoded:
    """With `desc`, a split of PROGRESS_FROM texts or more shows a progress bar (stderr) while it encodes."""
    texts = split.texts
    show = desc is not None and len(texts) >= PROGRESS_FROM and jax.process_index() == 0
    sequences = []
    with tqdm(total=len(texts), desc=desc, disable=not show, leave=False, mininterval=1, unit="text") as bar:
        for start in range(0, len(texts), CHUNK):
            sequences += tokenizer.encode(texts[start:start + CHUNK])
            bar.update(min(CHUNK, len(texts) - start))
    ids, lengths = tokenization.pad(sequences, cfg.max_length, cfg.padding, cfg.truncation)
    return Encoded(ids, lengths, split.labels)


def _cache_key(cfg, dataset: data_lib.Dataset, tokenizer) -> str:
    sizes = {s: len(v.texts) for s, v in dataset.splits.items()}
    blob = json.dumps([cfg.to_dict(), sizes, tokenizer.fingerprint], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode_splits(dataset: data_lib.Dataset, tokenizer, cfg, workdir: pathlib.Path) -> dict[str, Encoded]:
    """Encodes every split once per (data config, tokenizer) and caches the arrays in the workdir."""
    cache = workdir / f"encoded_{_cache_key(cfg, dataset, tokenizer)}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return {s: Encoded(f[f"{s}/ids"], f[f"{s}/lengths"], f[f"{s}/labels"])
                    for s in dataset.splits}
    encoded = {s: encode(split, tokenizer, cfg, desc=f"tokenize {s}") for s, split in dataset.splits.items()}
    arrays = {f"{s}/{k}": getattr(e, k) for s, e in encoded.items() for k in ("ids", "lengths", "labels")}
    with files.atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return encoded


class Batches:
    """Batches of one split: shuffled per epoch (train) or in a fixed order (eval).

    A batch is a dict of NumPy arrays: `ids` [B, W] and `mask` [B, W] trimmed to a bucket
    width W (a multiple of `bucket_width`, at most max_length), `label` [B] and `weight` [B]
    (0 for the rows that pad the final batch to full size).
    """

    def __init__(self, split: Encoded, batch_size: int, *, padding: str, shuffle: bool,
                 seed: int = 0, bucket_width: int = 0, sort_chunk: int = 50,
                 process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must divide evenly over {process_count} processes")
        self.split, self.batch_size, self.padding = split, batch_size, padding
        self.shuffle, self.seed, self.bucket_width, self.sort_chunk = shuffle, seed, bucket_width, sort_chunk
        self.process_index, self.process_count = process_index, process_count

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def order(self, epoch: int) -> list[np.ndarray]:
        """The global list of index batches for an epoch (rows of -1 pad the last one)."""
        n, b = len(self.split), self.batch_size
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n)
            if self.bucket_width:
                # Sort within large chunks so batches hold similar lengths, then shuffle batches.
                chunk = b * self.sort_chunk
                perm = np.concatenate([
                    c[np.argsort(self.split.lengths[c], kind="stable")]
                    for c in np.split(perm, range(chunk, n, chunk))])
        elif self.bucket_width:  # eval: shortest first, so most batches are narrow
            perm = np.argsort(self.split.lengths, kind="stable")
        else:
            perm = np.arange(n)
        perm = np.concatenate([perm, -np.ones(len(self) * b - n, perm.dtype)])
        batches = perm.reshape(len(self), b)
        if self.shuffle and self.bucket_width:
            batches = batches[rng.permutation(len(batches))]
        return list(batches)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Materialises this process's rows of a global index batch."""
        full = self.split.ids.shape[1]
        width = full
        if self.bucket_width:  # from the global batch, so every process agrees on the shape
            real = indices[indices >= 0]
            longest = int(self.split.lengths[real].max()) if len(real) else 1
            width = min(full, max(self.bucket_width, -(-longest // self.bucket_width) * self.bucket_width))
        per = len(indices) // self.process_count
        indices = indices[self.process_index * per:(self.process_index + 1) * per]
        valid = indices >= 0
        safe = np.where(valid, indices, 0)
        lengths = np.where(valid, self.split.lengths[safe], 0)
        ids = self.split.ids[safe]
        ids = ids[:, full - width:] if self.padding == "pre" else ids[:, :width]
        positions = np.arange(width)[None, :]
        if self.padding == "pre":
            mask = positions >= (width - lengths[:, None])
        else:
            mask = positions < lengths[:, None]
        return {"ids": np.where(mask, ids, 0), "mask": mask,
                "label": np.where(valid, self.split.labels[safe], 0).astype(np.int32),
                "weight": valid.astype(np.float32)}

    def epoch(self, epoch: int, start: int = 0):
        """Yields (batch index, batch) from `start`, so a resumed run continues mid-epoch."""
        for i, indices in enumerate(self.order(epoch)):
            if i >= start:
                yield i, self.batch(indices)


def pad_batch(inputs, width: int, rows: int, *, padding: str, truncation: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-text inputs -> (ids, mask) [rows, width], truncated, padded and masked exactly as training batches
    them; rows beyond the inputs are all padding. Inference and exported programs take these."""
    ids, lengths = tokenization.pad(list(inputs), width, padding, truncation)
    batches = Batches(Encoded(ids, lengths, np.zeros(len(inputs), np.int32)), rows, padding=padding, shuffle=False)
    batch = batches.batch(batches.order(0)[0])
    return batch["ids"], batch["mask"]
