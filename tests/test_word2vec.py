"""Skip-gram pretraining: pairs and loss against brute force and NumPy, learned structure, and
the pretrained table reaching the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, write_dataset

from sentiment_jax import runs, state, train, word2vec
from sentiment_jax.models.from_data import TrainingData


def brute_force_pairs(sequences, window):
    """Every (center, context) pair within `window` positions of the same text, both ids > 1."""
    pairs = set()
    for seq in sequences:
        seq = [t for t in seq if t > 1]
        for i, center in enumerate(seq):
            for j in range(max(0, i - window), min(len(seq), i + window + 1)):
                if j != i:
                    pairs.add((i, j, center, seq[j]))
    return pairs


def test_pairs_stay_in_their_window_and_text():
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 30, n).astype(np.int32) for n in (1, 7, 0, 12, 5)]
    keep = np.ones(30)
    as_ids = lambda pairs: sorted(map(tuple, pairs.tolist()))
    one = word2vec.skipgram_pairs(sequences, 1, keep, rng)
    # Window 1 draws no randomness that matters: exactly the neighbours, counted with multiplicity.
    assert as_ids(one) == sorted((c, o) for _, _, c, o in brute_force_pairs(sequences, 1))
    three = {tuple(p) for p in word2vec.skipgram_pairs(sequences, 3, keep, rng).tolist()}
    within = {(c, o) for _, _, c, o in brute_force_pairs(sequences, 3)}
    assert {(c, o) for c, o in as_ids(one)} <= three <= within
    assert 0 not in np.asarray(list(three)) and 1 not in np.asarray(list(three))  # padding, unknown


def test_keep_probabilities_thin_frequent_words_only():
    counts = np.array([0, 0, 1, 10, 1000, 100_000], np.float64)
    keep = word2vec.keep_probabilities(counts, 1e-3)
    f = counts / counts.sum()
    expected = np.minimum(np.sqrt(1e-3 / f[2:]) + 1e-3 / f[2:], 1)
    np.testing.assert_allclose(keep[2:], expected)
    assert keep[5] < 0.05 and keep[2] == 1 and np.all(keep[:2] == 0)
    assert np.all(word2vec.keep_probabilities(counts, 0) == 1)


def test_loss_matches_numpy():
    rng = np.random.default_rng(1)
    c, o, n = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(4, 3, 6))
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    expected = -np.mean([log_sigmoid(c[b] @ o[b]) + sum(log_sigmoid(-(c[b] @ n[b, k])) for k in range(3))
                         for b in range(4)])
    got = word2vec.negative_sampling_loss(jnp.asarray(c), jnp.asarray(o), jnp.asarray(n))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_words_that_share_contexts_end_up_close():
    """Two topics whose words never meet: vectors within a topic beat vectors across topics."""
    rng = np.random.default_rng(0)
    topics = [np.arange(2, 12), np.arange(12, 22)]
    sequences = [rng.choice(topics[i % 2], 30).astype(np.int32) for i in range(400)]
    table = word2vec.train(sequences, 22, 16, epochs=3, batch_size=256, learning_rate=1e-2, subsample=0)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    sims = unit[2:] @ unit[2:].T
    same = np.equal.outer(np.arange(20) // 10, np.arange(20) // 10) & ~np.eye(20, dtype=bool)
    assert sims[same].mean() > 0.5 and sims[same].mean() - sims[~same & ~np.eye(20, dtype=bool)].mean() > 0.5


def test_a_run_starts_from_the_cached_vectors(tmp_path):
    files = write_dataset(tmp_path)
    cfg = tiny_config(files, **{"mesh.num_devices": 1, "train.epochs": 1, "pretrain.embeddings": "word2vec",
                                "pretrain.epochs": 1, "pretrain.subsample": 0.0})
    workdir = tmp_path / "run"
    train.train_and_evaluate(cfg, workdir)
    (cached,) = workdir.glob("word2vec_*.npy")
    table = np.load(cached)
    assert table.shape == (runs.load_encoder(workdir, cfg).vocab_size, cfg.model.embed_dim) and np.all(table[0] == 0)
    # The model's table starts as the vectors rescaled to the random initialisation's spread.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    size = table.shape[0]
    data = lambda embeddings: TrainingData(np.zeros((0, 4), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                                           "pre", size, 2, 2, embeddings)
    random_start, _ = state.create_state(cfg, mesh, size, 2, total_steps=1, data=data(None))
    started, _ = state.create_state(cfg, mesh, size, 2, total_steps=1, data=data(table))
    start = np.asarray(started.params["embed"]["embedding"][...])
    scale = np.asarray(random_start.params["embed"]["embedding"][...]).std() / table.std()
    np.testing.assert_allclose(start, table * scale, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"pretrained embeddings \(\d+, 4\) do not fit"):
        state.create_state(cfg, mesh, size, 2, total_steps=1, data=data(table[:, :4]))


@pytest.mark.parametrize("field,value,message", [
    ("data.tokenizer.kind", "ngrams", "needs data.tokenizer.kind 'word'"),
    ("pretrain.window", 0, "pretrain.window must be a positive integer"),
    ("pretrain.subsample", -1.0, "pretrain.subsample >= 0"),
    ("pretrain.embeddings", "glove", "unknown pretrain.embeddings 'glove'"),
])
def test_pretrain_config_mistakes_fail_before_reading_data(field, value, message):
    cfg = tiny_config({"train": "missing.csv", "test": "missing.csv"},
                      **{"pretrain.embeddings": "word2vec", field: value})
    with pytest.raises(ValueError, match=message):
        train.check_config(cfg)
