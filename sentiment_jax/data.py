"""Raw text datasets: where the reviews come from, checked, as (texts, labels) splits.

Every source returns the same thing, a `Dataset` of named `Split`s with integer labels,
so tokenisation, batching and training never need to know where the text came from.
Bad input raises `DataError` with one line naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import tarfile
import urllib.error
import urllib.request
from typing import Callable, Iterable, Sequence

import numpy as np

from sentiment_jax._extras import require

DATA_ENV = "SENTIMENT_JAX_DATA"
CACHE_ENV = "SENTIMENT_JAX_CACHE"
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
# MD5 of the official release archive (as published by torchtext / tfds).
IMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
NUSAX_LANGUAGES = (
    "acehnese", "balinese", "banjarese", "buginese", "english", "indonesian",
    "javanese", "madurese", "minangkabau", "ngaju", "sundanese", "toba_batak",
)
NUSAX_LABELS = ("negative", "neutral", "positive")
# The longest CSV field read, in characters (Python's csv module stops at 131,072 by default).
MAX_FIELD_CHARS = 10_000_000


class DataError(ValueError):
    """A problem with input data, phrased as one line that names the fix."""


@dataclasses.dataclass
class Split:
    texts: list[str]
    labels: np.ndarray  # int32, values in [0, num_classes)


@dataclasses.dataclass
class Dataset:
    name: str
    label_names: tuple[str, ...]
    splits: dict[str, Split]
    unlabeled: list[str] = dataclasses.field(default_factory=list)  # for pretraining only (data.unlabeled)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


# ---------------------------------------------------------------------------------------
# Locating files.


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(CACHE_ENV, "~/.cache/sentiment_jax")).expanduser()


def _candidates(config_path: str | None, *names: str) -> list[pathlib.Path]:
    """Where to look, in order: config.data.path, $SENTIMENT_JAX_DATA, the cache dir."""
    roots = [pathlib.Path(p).expanduser() for p in (config_path, os.environ.get(DATA_ENV)) if p]
    roots.append(cache_dir())
    found = []
    for root in roots:
        found.append(root)
        found.extend(root / n for n in names)
    return found


def find_imdb(config_path: str | None, download: bool = True) -> pathlib.Path:
    """Returns an `aclImdb/` folder or `aclImdb_v1.tar.gz` archive, downloading if allowed."""
    for path in _candidates(config_path, "aclImdb_v1.tar.gz", "aclImdb"):
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            return path
        if path.is_dir() and (path / "train" / "pos").is_dir():
            return path
    if not download:
        raise DataError(
            f"IMDB not found; set --config.data.path or ${DATA_ENV} to a folder holding "
            "aclImdb_v1.tar.gz or aclImdb/")
    return _download(IMDB_URL, cache_dir() / "aclImdb_v1.tar.gz", IMDB_MD5)


def _download(url: str, target: pathlib.Path, md5: str) -> pathlib.Path:
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            total = int(response.headers.get("Content-Length") or 0)
            digest = hashlib.md5()
            with open(partial, "wb") as f, tqdm(
                total=total or None, unit="B", unit_scale=True, desc=f"download {target.name}"
            ) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} ({e}); offline? put aclImdb_v1.tar.gz in a folder "
            f"and pass --config.data.path=FOLDER or set ${DATA_ENV}") from None
    if digest.hexdigest() != md5:
        partial.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: got md5 {digest.hexdigest()}, want {md5}")
    partial.rename(target)
    return target


# ---------------------------------------------------------------------------------------
# Sources. Each returns {split_name: Split}; `load_dataset` adds validation and checks.


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # drops the byte-order mark that Excel puts first
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                        "re-encode the file as UTF-8") from None


def _check_text(text: str, where: str) -> str:
    if not text or not text.strip():
        raise DataError(f"{where}: empty text; remove the row or fill in the text")
    return text


def load_imdb(cfg) -> tuple[dict[str, Split], tuple[str, ...]]:
    """The official aclImdb layout, read from the archive or the extracted folder.

    With `data.unlabeled`, also train/unsup's 50k unlabelled reviews, as split "unlabeled".
    """
    path = find_imdb(cfg.path, download=cfg.download)
    label_names = ("neg", "pos")
    texts = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    unlabeled = []

    def add(member: str, raw: bytes):
        parts = member.split("/")  # [..., 'aclImdb', split, label, 'id_rating.txt']
        if len(parts) < 3 or not parts[-1].endswith(".txt"):
            return
        split, label = parts[-3], parts[-2]
        where = f"{path}:{member}"
        if split in texts and label in label_names:
            texts[split].append(_check_text(_decode(raw, where), where))
            labels[split].append(label_names.index(label))
        elif split == "train" and label == "unsup" and cfg.unlabeled:
            unlabeled.append(_check_text(_decode(raw, where), where))

    if path.is_dir():
        for split in texts:
            for label in label_names + (("unsup",) if split == "train" and cfg.unlabeled else ()):
                for f in sorted((path / split / label).glob("*.txt")):
                    add(f"aclImdb/{split}/{label}/{f.name}", f.read_bytes())
    else:
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    if member.isfile():
                        add(member.name, tar.extractfile(member).read())
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{path}: unreadable archive ({e}); re-download aclImdb_v1.tar.gz") from None
    splits = {s: Split(texts[s], np.asarray(labels[s], np.int32)) for s in texts}
    if cfg.unlabeled:
        splits["unlabeled"] = Split(unlabeled, np.zeros(len(unlabeled), np.int32))
    return splits, label_names


def _read_rows(path: pathlib.Path, fmt: str) -> Iterable[tuple[int, dict]]:
    """Yields (line number, row dict) from a CSV or JSON-lines file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the data path")
    text = _decode(path.read_bytes(), str(path))
    if fmt == "csv":
        csv.field_size_limit(MAX_FIELD_CHARS)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as e:  # in practice a field over the limit
            raise DataError(f"{path}:{reader.reader.line_num}: unreadable CSV ({e}); a field may hold up to "
                            f"{MAX_FIELD_CHARS:,} characters, so shorten or split longer texts") from None
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line")
            yield n, row


def read_table(path: pathlib.Path, fmt: str, text_field: str, label_field: str,
               label_names: Sequence[str] | None) -> tuple[list[str], list]:
    """Reads texts and raw labels; label mapping happens once all splits are known."""
    texts, raw_labels = [], []
    for line, row in _read_rows(path, fmt):
        where = f"{path}:{line}"
        for field in (text_field, label_field):
            if field not in row or row[field] is None:
                raise DataError(f"{where}: missing field '{field}'; set --config.data.text_field / "
                                "label_field to the file's column names")
        texts.append(_check_text(str(row[text_field]), where))
        raw_labels.append((row[label_field], where))
    if not texts:
        raise DataError(f"{path}: no rows; the split is empty")
    return texts, raw_labels


def _is_integer(label) -> bool:
    return str(label).strip().lstrip("-").isdigit()


def infer_label_names(raw_train) -> tuple[str, ...]:
    """The distinct labels of the training split, sorted (as numbers when all are integers)."""
    found = {str(v).strip() for v, _ in raw_train}
    return tuple(sorted(found, key=int if all(map(_is_integer, found)) else str))


def _map_labels(raw_labels, label_names: Sequence[str], indices: bool) -> np.ndarray:
    """Labels -> class ids by name. An integer that names no class is a class index only when `indices`
    (the class names were given, so their order is known); otherwise it is the mistake of mixing
    names and numbers, e.g. 0/1 in a test file whose training file says neg/pos."""
    index = {str(name): i for i, name in enumerate(label_names)}
    out = []
    for value, where in raw_labels:
        key = str(value).strip()
        if key in index:
            out.append(index[key])
        elif _is_integer(key) and indices and 0 <= int(key) < len(label_names):
            out.append(int(key))
        elif _is_integer(key) and not indices and not all(map(_is_integer, label_names)):
            raise DataError(f"{where}: label '{value}' is a number but the training labels are names "
                            f"{list(label_names)}; write the names, or set --config.data.label_names="
                            f"{','.join(label_names)} to read numbers as class indices in that order")
        else:
            raise DataError(f"{where}: unknown label '{value}'; expected one of "
                            f"{list(label_names)} (set --config.data.label_names)")
    return np.asarray(out, np.int32)


def _load_tables(files: dict[str, pathlib.Path], fmt: str, cfg):
    given = tuple(cfg.label_names or ())
    read = {s: read_table(p, fmt, cfg.text_field, cfg.label_field, given)
            for s, p in files.items()}
    label_names = given or infer_label_names(read["train"][1])
    splits = {s: Split(texts, _map_labels(raw, label_names, indices=bool(given)))
              for s, (texts, raw) in read.items()}
    return splits, label_names


def nusax_train_languages(cfg) -> tuple[str, ...]:
    """The languages whose train splits are pooled: data.train_languages ("all" or a comma
    list), else data.language alone. Checked here so a bad name fails before any file is read.
    """
    spec = cfg.train_languages or cfg.language
    listed = (n.strip() for n in spec.split(",") if n.strip())
    names = NUSAX_LANGUAGES if spec == "all" else tuple(dict.fromkeys(listed))  # in order, once each
    if not names:
        raise DataError(f"data.train_languages '{spec}' names no language; give a comma list or 'all'")
    for name in (cfg.language, *names):
        if name not in NUSAX_LANGUAGES:
            raise DataError(f"unknown NusaX language '{name}'; choose one of {list(NUSAX_LANGUAGES)} (or 'all' "
                            "for data.train_languages)")
    return names


def _nusax_folder(cfg, language: str) -> pathlib.Path:
    roots = _candidates(cfg.path, "nusax_senti")
    root = next((r / language for r in roots if (r / language / "train.csv").is_file()), None)
    if root is None:
        raise DataError(f"NusaX-Senti '{language}' not found; set --config.data.path or "
                        f"${DATA_ENV} to a folder holding nusax_senti/{language}/train.csv")
    return root


def load_nusax(cfg):
    """Validation and test of data.language; train pooled over `nusax_train_languages`.

    NusaX is parallel: every language splits the same sentence ids the same way, so another
    language's train split holds translations of training sentences only, never of test ones.
    """
    train_languages = nusax_train_languages(cfg)
    cfg = _with(cfg, text_field="text", label_field="label", label_names=NUSAX_LABELS)
    trains = [_load_tables({"train": _nusax_folder(cfg, lang) / "train.csv"}, "csv", cfg)[0]["train"]
              for lang in train_languages]
    root = _nusax_folder(cfg, cfg.language)
    splits, label_names = _load_tables({"validation": root / "valid.csv", "test": root / "test.csv"}, "csv", cfg)
    train = Split([t for s in trains for t in s.texts], np.concatenate([s.labels for s in trains]))
    return {"train": train, **splits}, label_names


def _table_loader(fmt: str):
    def load(cfg):
        files = {s: pathlib.Path(p).expanduser() for s, p in
                 (("train", cfg.train_file), ("validation", cfg.validation_file),
                  ("test", cfg.test_file)) if p}
        if "train" not in files:
            raise DataError(f"{fmt} dataset needs --config.data.train_file=PATH")
        return _load_tables(files, fmt, cfg)
    return load


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_huggingface(cfg):
    """A Hugging Face dataset by hub name, or a local folder of train/test data files.

    Offline, `datasets` retries the hub for minutes unless told it is offline, so we check
    the hub once (3 s) and switch it to offline mode; local folders and caches still work.
    """
    datasets = require("datasets", "hf")
    name = cfg.hf_name
    if not name:
        raise DataError("dataset 'huggingface' needs --config.data.hf_name=NAME_OR_FOLDER")
    if not pathlib.Path(name).expanduser().exists() and not _hub_reachable():
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(str(pathlib.Path(name).expanduser()) if pathlib.Path(name).expanduser().exists()
                                   else name, cfg.hf_config or None)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"could not load Hugging Face dataset '{name}' ({type(e).__name__}: {first[:200]}); "
                        "offline? pass a local folder as --config.data.hf_name") from None
    feature = ds["train"].features.get(cfg.label_field) if "train" in ds else None
    label_names = tuple(cfg.label_names or getattr(feature, "names", None) or ())
    raw = {}
    for ours, theirs in (("train", "train"), ("validation", "validation"), ("test", "test")):
        if theirs in ds:
            rows = ds[theirs]
            for field in (cfg.text_field, cfg.label_field):
                if field not in rows.column_names:
                    raise DataError(f"{name}[{theirs}]: missing field '{field}' (has {rows.column_names}); "
                                    "set --config.data.text_field / label_field")
            where = lambda i: f"{name}[{theirs}][{i}]"
            raw[ours] = ([_check_text(t, where(i)) for i, t in enumerate(rows[cfg.text_field])],
                         [(v, where(i)) for i, v in enumerate(rows[cfg.label_field])])
    if "train" not in raw:
        raise DataError(f"Hugging Face dataset '{name}' has no train split")
    indices = bool(label_names)  # given, or the dataset's own class names (integers index them)
    label_names = label_names or infer_label_names(raw["train"][1])
    return {s: Split(t, _map_labels(r, label_names, indices)) for s, (t, r) in raw.items()}, label_names


def load_tfds(cfg):
    """A prepared TFDS dataset by name, read through its random-access data source (no TensorFlow)."""
    tfds = require("tensorflow_datasets", "tfds")
    name = cfg.tfds_name
    if not name:
        raise DataError("dataset 'tfds' needs --config.data.tfds_name=NAME")
    try:
        builder = tfds.builder(name, data_dir=cfg.path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"unknown TFDS dataset '{name}' ({type(e).__name__}); check the name") from None
    if not builder.info.splits:
        raise DataError(f"TFDS dataset '{name}' is not prepared under {builder.data_dir}; build it where online "
                        f"(`tfds build {name} --file_format=array_record`) and set --config.data.path to its data_dir")
    splits = {}
    for ours, theirs in (("train", "train"), ("validation", "validation"), ("test", "test")):
        if theirs in builder.info.splits:
            source = builder.as_data_source(split=theirs)
            texts, labels = [], []
            for i in range(len(source)):
                row, where = source[i], f"{name}[{theirs}][{i}]"
                text = row[cfg.text_field]
                texts.append(_check_text(_decode(text, where) if isinstance(text, bytes) else str(text), where))
                labels.append(int(row[cfg.label_field]))
            splits[ours] = Split(texts, np.asarray(labels, np.int32))
    names = getattr(builder.info.features[cfg.label_field], "names", None)
    return splits, tuple(cfg.label_names or names)


SOURCES: dict[str, Callable] = {
    "imdb": load_imdb,
    "nusax_senti": load_nusax,
    "csv": _table_loader("csv"),
    "jsonl": _table_loader("jsonl"),
    "huggingface": load_huggingface,
    "tfds": load_tfds,
}


def _with(cfg, **updates):
    import ml_collections

    out = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    for k, v in updates.items():
        out[k] = v
    return out


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Deterministic split of train into (train, validation), stratified by label."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for label in np.unique(train.labels):
        idx = np.flatnonzero(train.labels == label)
        rng.shuffle(idx)
        val_idx.extend(idx[: int(round(fraction * len(idx)))])
    is_val = np.zeros(len(train.labels), bool)
    is_val[val_idx] = True
    pick = lambda mask: Split([t for t, m in zip(train.texts, mask) if m], train.labels[mask])
    return pick(~is_val), pick(is_val)


def subsample(split: Split, n: int, seed: int) -> Split:
    """A seeded random subset of at most n examples, kept in the original order."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(split.texts))[:n])
    return Split([split.texts[i] for i in idx], split.labels[idx])


def load_dataset(cfg) -> Dataset:
    """Loads `cfg.name` and guarantees non-empty train, validation and test splits."""
    if cfg.name not in SOURCES:
        raise DataError(f"unknown dataset '{cfg.name}'; choose one of {sorted(SOURCES)}")
    splits, label_names = SOURCES[cfg.name](cfg)
    unlabeled = splits.pop("unlabeled", Split([], np.zeros(0, np.int32)))
    if cfg.unlabeled and not unlabeled.texts:
        raise DataError(f"data.unlabeled: dataset '{cfg.name}' has no unlabeled texts (only imdb's train/unsup); "
                        "set --config.data.unlabeled=False")
    if "validation" not in splits:
        splits["train"], splits["validation"] = carve_validation(
            splits["train"], cfg.validation_fraction, cfg.validation_seed)
    if "test" not in splits:
        raise DataError(f"dataset '{cfg.name}' has no test split; set --config.data.test_file")
    if cfg.max_examples:
        splits = {s: subsample(v, cfg.max_examples, cfg.validation_seed) for s, v in splits.items()}
        unlabeled = subsample(unlabeled, cfg.max_examples, cfg.validation_seed)
    if cfg.max_test_examples:
        splits["test"] = subsample(splits["test"], cfg.max_test_examples, cfg.validation_seed)
    if cfg.train_on_validation:  # the final refit: validation texts are training texts too
        train, val = splits["train"], splits["validation"]
        splits["train"] = Split(list(train.texts) + list(val.texts), np.concatenate([train.labels, val.labels]))
    for name, split in splits.items():
        if len(split.texts) == 0:
            raise DataError(f"dataset '{cfg.name}': the {name} split is empty; add data or "
                            "lower --config.data.validation_fraction")
    classes = np.unique(splits["train"].labels)
    if len(classes) < 2:
        raise DataError(f"dataset '{cfg.name}': every training example has the label '{label_names[classes[0]]}'; "
                        "a classifier needs examples of at least 2 classes to learn from")
    return Dataset(cfg.name, tuple(str(n) for n in label_names), splits, unlabeled.texts)
