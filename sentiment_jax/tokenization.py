"""Text -> token ids. `runs.py` saves the tokenizer in the workdir so eval and serving reuse it exactly.

Three kinds share one interface (`encode(texts) -> list[np.ndarray]`, `vocab_size`, `spec()`):
a word-level vocabulary fitted on the training split only, the same words plus hashed
character and word n-grams (fastText-style features, for the bag-of-embeddings model), and
any Hugging Face `tokenizer.json` from a local folder. `spec()` is what the run's `encoder.json`
holds; a Hugging Face tokenizer is saved beside it as a real `tokenizer.json`. `encode_windows`
cuts a text into a frozen backbone's windows, each followed by the prompt template (verbalizer.py).
"""

from __future__ import annotations

import collections
import hashlib
import json
import pathlib
import re
import zlib
from typing import Sequence

import numpy as np

from sentiment_jax._extras import require

PAD_ID, UNK_ID = 0, 1
_WORD = re.compile(r"[a-z0-9']+")
_WORD_CASED = re.compile(r"[A-Za-z0-9']+")
HF_FILE = "tokenizer.json"  # Hugging Face's name for its own format


class WordTokenizer:
    """Words from `[a-z0-9']+` with `<br />` removed; 0 = padding, 1 = unknown."""

    kind = "word"

    def __init__(self, words: Sequence[str], lowercase: bool = True):
        self.words = list(words)
        self.lowercase = lowercase
        self._index = {w: i + 2 for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 2

    def split(self, text: str) -> list[str]:
        text = text.replace("<br />", " ")
        if self.lowercase:
            return _WORD.findall(text.lower())
        return _WORD_CASED.findall(text)

    @classmethod
    def fit(cls, texts: Sequence[str], vocab_size: int, lowercase: bool = True) -> "WordTokenizer":
        counts = collections.Counter()
        probe = cls([], lowercase)
        for text in texts:
            counts.update(probe.split(text))
        # Most frequent first; ties broken alphabetically so the vocabulary is deterministic.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked[: max(vocab_size - 2, 0)]], lowercase)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        get = self._index.get
        return [np.fromiter((get(w, UNK_ID) for w in self.split(t)), np.int32) for t in texts]

    def spec(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "words": self.words}

    @property
    def fingerprint(self) -> str:
        """Identifies the vocabulary, for caches of encoded data."""
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]


class NgramTokenizer(WordTokenizer):
    """fastText-style features: per word, its vocabulary id (if known), the character n-grams
    of `<word>` and the word n-grams ending at it, the n-grams hashed into `buckets` shared ids.

    A word unseen in training still shares n-grams with known words (`bagus`, `bagusnya`),
    which matters when only a few hundred sentences are available. Ids: 0 padding, 1 unused,
    then the words, then the buckets; unknown words contribute their n-grams only.
    """

    kind = "ngrams"

    def __init__(self, words: Sequence[str], lowercase: bool = True, char_ngrams: Sequence[int] = (3, 5),
                 word_ngrams: int = 2, buckets: int = 100_000):
        super().__init__(words, lowercase)
        self.char_ngrams, self.word_ngrams, self.buckets = tuple(char_ngrams), int(word_ngrams), int(buckets)
        self._cache: dict[str, list[tuple[str, int]]] = {}  # word -> its pieces

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 2 + self.buckets

    def _hash(self, piece: str) -> int:
        return len(self.words) + 2 + zlib.crc32(piece.encode()) % self.buckets  # stable across runs

    def _word_pieces(self, word: str) -> list[tuple[str, int]]:
        if word not in self._cache:
            lo, hi = self.char_ngrams
            marked = f"<{word}>"
            grams = [marked[i:i + n] for n in range(max(lo, 1), hi + 1) for i in range(len(marked) - n + 1)]
            known = [(word, self._index[word])] if word in self._index else []
            self._cache[word] = known + [(g, self._hash(g)) for g in grams]
        return self._cache[word]

    def pieces(self, text: str) -> list[tuple[str, int]]:
        """(feature, id) in encoding order: per word, itself, its character n-grams, the word n-grams ending at it."""
        words, out = self.split(text), []
        for i, word in enumerate(words):
            out += self._word_pieces(word)
            # Joined by spaces, a word n-gram is never the same string as a character n-gram.
            for n in range(2, min(self.word_ngrams, i + 1) + 1):
                gram = " ".join(words[i - n + 1:i + 1])
                out.append((gram, self._hash(gram)))
        return out

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray([i for _, i in self.pieces(t)], np.int32) for t in texts]

    def spec(self) -> dict:
        return {**super().spec(), "char_ngrams": list(self.char_ngrams), "word_ngrams": self.word_ngrams,
                "buckets": self.buckets}


class HFTokenizer:
    """A Hugging Face fast tokenizer from a local folder, without its own padding/truncation."""

    kind = "huggingface"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    @classmethod
    def from_folder(cls, path: str | pathlib.Path) -> "HFTokenizer":
        Tokenizer = require("tokenizers", "hf").Tokenizer
        path = pathlib.Path(path).expanduser()
        file = path / HF_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{file}: no tokenizer.json; point --config.data.tokenizer.path "
                             "at a Hugging Face model folder")
        return cls(Tokenizer.from_file(str(file)))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def spec(self) -> dict:
        return {"kind": self.kind, "file": HF_FILE}

    def to_str(self) -> str:
        """The Hugging Face `tokenizer.json` text (`Tokenizer.from_file` reads it back)."""
        return self.tokenizer.to_str()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]


def build(cfg, train_texts: Sequence[str]):
    """Creates the tokenizer a config asks for, fitting a word vocabulary on train only."""
    if cfg.kind == "word":
        return WordTokenizer.fit(train_texts, cfg.vocab_size, cfg.lowercase)
    if cfg.kind == "ngrams":
        words = WordTokenizer.fit(train_texts, cfg.vocab_size, cfg.lowercase).words
        return NgramTokenizer(words, cfg.lowercase, tuple(cfg.char_ngrams), cfg.word_ngrams, cfg.buckets)
    return HFTokenizer.from_folder(cfg.path)


def from_spec(spec: dict, directory: pathlib.Path):
    """The tokenizer a run saved: its `spec()`, and for Hugging Face the file beside it in `directory`."""
    if spec["kind"] == "word":
        return WordTokenizer(spec["words"], spec["lowercase"])
    if spec["kind"] == "ngrams":
        return NgramTokenizer(spec["words"], spec["lowercase"], spec["char_ngrams"], spec["word_ngrams"],
                              spec["buckets"])
    return HFTokenizer.from_folder(directory / spec["file"])


def inverse_document_frequency(sequences: Sequence[np.ndarray], vocab_size: int) -> np.ndarray:
    """Smoothed IDF per id, ln((1 + n) / (1 + df)) + 1 as scikit-learn's TfidfVectorizer, from n encoded texts.

    An id that no text contains gets 0, not the largest weight: its embedding was never
    trained, so a bag model should ignore it, as a linear model ignores words outside its vocabulary.
    """
    df = np.zeros(vocab_size, np.int64)
    for seq in sequences:
        df[np.unique(np.asarray(seq, np.int64))] += 1
    idf = np.log((1.0 + len(sequences)) / (1.0 + df)) + 1.0
    return np.where(df > 0, idf, 0.0).astype(np.float32)


def log_count_ratios(sequences: Sequence[np.ndarray], labels: Sequence[int], vocab_size: int, num_classes: int,
                     alpha: float = 1.0) -> np.ndarray:
    """[vocab_size, num_classes] Naive Bayes log-count ratio of each id for each class against the others.

    As NBSVM (Wang and Manning, 2012) on binary features: with p = alpha + the number of texts of
    the class that contain the id and q = alpha + that number for the other texts, r = ln(p / |p|_1)
    - ln(q / |q|_1), the norms summing over ids. Ids that no text contains get 0.
    """
    counts = np.zeros((vocab_size, num_classes), np.float64)
    for seq, label in zip(sequences, labels):
        counts[np.unique(np.asarray(seq, np.int64)), label] += 1
    p = alpha + counts
    q = alpha + counts.sum(1, keepdims=True) - counts
    ratios = np.log(p / p.sum(0)) - np.log(q / q.sum(0))
    return np.where(counts.sum(1, keepdims=True) > 0, ratios, 0.0).astype(np.float32)


def pad(sequences: Sequence[np.ndarray], max_length: int, padding: str = "pre",
        truncation: str = "pre") -> tuple[np.ndarray, np.ndarray]:
    """Packs id sequences into an [N, max_length] array (pad id 0) and their lengths.

    `truncation='pre'` drops tokens from the front (keeps the end of a review);
    `padding='pre'` puts the padding in front, as Keras does.
    """
    for name, side in (("padding", padding), ("truncation", truncation)):
        if side not in ("pre", "post"):
            raise ValueError(f"data.{name} must be 'pre' or 'post', got '{side}'")
    ids = np.zeros((len(sequences), max_length), sequences[0].dtype if len(sequences) else np.int32)
    lengths = np.zeros(len(sequences), np.int32)
    for i, seq in enumerate(sequences):
        seq = seq[-max_length:] if truncation == "pre" else seq[:max_length]
        n = len(seq)
        lengths[i] = n
        if n:
            if padding == "pre":
                ids[i, max_length - n:] = seq
            else:
                ids[i, :n] = seq
    return ids, lengths


# ---------------------------------------------------------------------------------------
# A frozen backbone's inputs: the text's word pieces in windows, each followed by a prompt template.


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] and [SEP])."""
    bare = tokenizer.encode("x", add_special_tokens=False).ids
    full = tokenizer.encode("x", add_special_tokens=True).ids
    start = next(i for i in range(len(full)) if full[i:i + len(bare)] == bare)
    return full[:start], full[start + len(bare):]


def encode_windows(tokenizer: HFTokenizer, texts: Sequence[str], template: str, max_length: int,
                   windows: int = 1, truncation: str = "pre") -> tuple[list[np.ndarray], np.ndarray]:
    """Rows of ids `[specials] window [template] [specials]` and, per row, the index of its text.

    The text is truncated (`truncation='pre'` keeps its end) to what fits in `windows`
    windows beside the template, then cut into full windows starting from the kept end; only
    the one furthest from it can be shorter. A text's first row is therefore the same for
    every `windows`, which lets `verbalizer.split_features` reuse the one-window features.
    """
    tok = tokenizer.tokenizer
    before, after = _special_tokens(tok)
    template = template.replace("{mask}", mask_token(tok))
    suffix = tok.encode(template, add_special_tokens=False).ids if template else []
    room = max_length - len(before) - len(after) - len(suffix)
    if room < 1:
        raise ValueError(f"data.max_length {max_length} leaves no room for text beside the template; raise it")
    cleaned = [t.replace("<br />", " ") for t in texts]  # IMDB's line breaks
    rows, owner = [], []
    for i, enc in enumerate(tok.encode_batch(cleaned, add_special_tokens=False)):
        ids = enc.ids
        budget = room * windows
        ids = ids[-budget:] if truncation == "pre" else ids[:budget]
        n = len(ids)
        if truncation == "pre":
            spans = [(max(0, end - room), end) for end in range(n, 0, -room)]
        else:
            spans = [(start, min(n, start + room)) for start in range(0, n, room)]
        for start, end in spans or [(0, 0)]:
            rows.append(np.asarray(before + ids[start:end] + suffix + after, np.int32))
            owner.append(i)
    return rows, np.asarray(owner, np.int64)


def mask_token(tok) -> str:
    """The tokenizer's mask token, which `{mask}` in a template stands for."""
    return next((t for t in ("[MASK]", "<mask>") if tok.token_to_id(t) is not None), "[MASK]")
