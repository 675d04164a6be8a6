"""What a model may take from the training data before its first step, through its own `from_data` hook.

A model class that needs statistics of the training texts (IDF, Naive Bayes ratios) or a
pretrained embedding table defines `from_data(self, data: TrainingData)`; `state.create_state`
calls it inside the jitted initialisation, so the loop never names a model.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass
class TrainingData:
    ids: np.ndarray  # [N, L] the training split as encoded, padded
    lengths: np.ndarray  # [N]
    labels: np.ndarray  # [N]
    padding: str  # data.padding: which side of `ids` holds the padding
    vocab_size: int
    num_classes: int
    num_outputs: int
    embeddings: np.ndarray | None = None  # [vocab, embed] when pretrain.embeddings asks for a table

    def sequences(self) -> list[np.ndarray]:
        """Each training text's ids (after truncation), without padding."""
        width = self.ids.shape[1]
        return [row[:n] if self.padding == "post" else row[width - n:] for row, n in zip(self.ids, self.lengths)]


def start_embeddings(embed: nnx.Embed, table: np.ndarray | None) -> None:
    """Pretrained vectors replace a token table's random start, rescaled to that start's standard deviation."""
    if table is None:
        return
    table = jnp.asarray(table, jnp.float32)
    embed.embedding[...] = table * (jnp.std(embed.embedding[...]) / jnp.std(table))
