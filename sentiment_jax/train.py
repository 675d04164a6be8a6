"""One train loop and one eval path for every model, sharded over a `jax.sharding.Mesh`.

The model is an NNX module; the step functions are pure: they take the model's
parameters as an `nnx.State`, merge them with the static graph inside `jax.jit`, and
return new state. Shardings are explicit on every jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from sentiment_jax import checkpoints
from sentiment_jax import data as data_lib
from sentiment_jax import distributed
from sentiment_jax import input_pipeline
from sentiment_jax import metrics as metrics_lib
from sentiment_jax import models
from sentiment_jax import sharding
from sentiment_jax import tokenization
from sentiment_jax import word2vec


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable variables (nnx.Param)
    rest: nnx.State  # other model variables, e.g. BatchNorm statistics
    opt_state: Any
    rng: jax.Array  # base key; the key of step s is fold_in(rng, s), so resuming is exact
    ema: nnx.State | None = None  # moving average of params (train.ema_decay > 0), what eval and serving use


# ---------------------------------------------------------------------------------------
# Losses: softmax cross-entropy over K logits, or sigmoid BCE over one logit (binary).


def num_outputs(cfg, num_classes: int) -> int:
    if cfg.train.loss == "softmax":
        return num_classes
    if cfg.train.loss == "sigmoid":
        if num_classes != 2:
            raise ValueError(f"train.loss 'sigmoid' needs 2 classes, the data has {num_classes}; use 'softmax'")
        return 1
    raise ValueError(f"unknown train.loss '{cfg.train.loss}'; choose 'softmax' or 'sigmoid'")


def probabilities(logits: jax.Array) -> jax.Array:
    """Class probabilities [B, K] from either loss's logits."""
    if logits.shape[-1] == 1:
        p = jax.nn.sigmoid(logits[:, 0])
        return jnp.stack([1 - p, p], axis=-1)
    return jax.nn.softmax(logits, axis=-1)


def per_example_loss(logits: jax.Array, labels: jax.Array, confidence_penalty: float = 0.0) -> jax.Array:
    """Softmax CE or sigmoid BCE; with a penalty λ, BCE - λ·|p - 0.5| (whose mean is bce - λ·mean|p - 0.5|)."""
    if logits.shape[-1] == 1:
        bce = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
        return bce - confidence_penalty * jnp.abs(jax.nn.sigmoid(logits[:, 0]) - 0.5)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def predictions(logits: jax.Array) -> jax.Array:
    return (logits[:, 0] > 0).astype(jnp.int32) if logits.shape[-1] == 1 else jnp.argmax(logits, -1)


# ---------------------------------------------------------------------------------------
# Optimizer and state.


def learning_rate(cfg, total_steps: int) -> optax.ScalarOrSchedule:
    """train.schedule as optax takes it: a constant stays a float, so its optimizer state holds no step count."""
    t = cfg.train
    warmup = max(int(t.warmup_fraction * total_steps), 1)
    if t.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, warmup, max(total_steps, warmup + 1),
                                                t.learning_rate * t.final_lr_fraction)
    elif t.schedule == "linear":
        lr = optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, warmup),
                                   optax.linear_schedule(t.learning_rate, t.learning_rate * t.final_lr_fraction,
                                                         max(total_steps - warmup, 1))], [warmup])
    elif t.schedule == "constant":
        lr = t.learning_rate
    else:
        raise ValueError(f"unknown train.schedule '{t.schedule}'; choose cosine, linear or constant")
    return lr


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    t, lr = cfg.train, learning_rate(cfg, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # kernels, not biases
    return optax.chain(optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
                       optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))


@dataclasses.dataclass
class Setup:
    """The static parts of a run: graph, optimizer, mesh and shardings."""

    graphdef: Any
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    state_sharding: Any
    batch_sharding: jax.sharding.NamedSharding
    mesh_config: Any = None  # for activation constraints (sharding.constrain)


def create_state(cfg, mesh, vocab_size: int, num_classes: int, total_steps: int,
                 feature_weights: np.ndarray | None = None,
                 embeddings: np.ndarray | None = None) -> tuple[TrainState, Setup]:
    """Initialises parameters directly into their shardings and the optimizer state beside them.

    `embeddings` [vocab, embed_dim] (pretrained vectors) replace the token embedding table's
    random start, rescaled to the standard deviation of that random start.
    """
    outputs = num_outputs(cfg, num_classes)
    build = lambda: models.build_model(cfg.model, vocab_size, outputs, nnx.Rngs(params=cfg.seed))
    graphdef, abstract_params, abstract_rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    param_sharding = sharding.state_shardings(abstract_params, mesh, cfg.mesh)
    rest_sharding = sharding.state_shardings(abstract_rest, mesh, cfg.mesh)

    @functools.partial(jax.jit, out_shardings=(param_sharding, rest_sharding))
    def init():
        model = build()
        if feature_weights is not None:  # fixed data statistics (fixed_feature_weights), not initialised parameters
            model.feature_weights[...] = jnp.asarray(feature_weights, jnp.float32)
        if embeddings is not None:
            table = jnp.asarray(embeddings, jnp.float32)
            model.embed.embedding[...] = table * (jnp.std(model.embed.embedding[...]) / jnp.std(table))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return params, rest

    if embeddings is not None:
        table = getattr(getattr(abstract_params, "embed", None), "embedding", None)
        if table is None or table.shape != embeddings.shape:
            raise ValueError(f"pretrained embeddings {embeddings.shape} do not fit model '{cfg.model.name}' "
                             f"(its table: {None if table is None else table.shape}); set pretrain.embeddings 'none'")
    params, rest = init()
    tx = make_optimizer(cfg, total_steps)
    # Optimizer moments are States of the same annotated Variables, so they shard like the params.
    opt_sharding = sharding.state_shardings(jax.eval_shape(tx.init, abstract_params), mesh, cfg.mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    replicated = sharding.replicated(mesh)
    # tx.init's outputs do not depend on the values of params, so jit would leave them on one
    # device: moments take their parameter's sharding, counters are replicated.
    opt_sharding = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_sharding,
                                         transform_non_params=lambda _: replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    # The average starts as a copy of the initial params (fresh buffers, same shardings).
    ema = jax.tree.map(lambda x: x.copy(), params) if cfg.train.get("ema_decay", 0.0) else None
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params, rest=rest,
                       opt_state=opt_state, rng=jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)),
                                                               replicated), ema=ema)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return state, Setup(graphdef, tx, mesh, state_sharding, sharding.batch_sharding(mesh, cfg.mesh), cfg.mesh)


def fixed_feature_weights(cfg, split: input_pipeline.Encoded, vocab_size: int, num_classes: int) -> np.ndarray | None:
    """The per-id statistics of the training texts as encoded (after truncation) that some models keep fixed:
    IDF for the bag model with model.bag_weights 'idf', NB log-count ratios for nb_linear. They are saved in
    every checkpoint, so eval and serving restore them."""
    name = cfg.model.name
    if not (name == "nb_linear" or (name == "fasttext" and cfg.model.get("bag_weights", "uniform") == "idf")):
        return None
    width = split.ids.shape[1]
    texts = [row[:n] if cfg.data.padding == "post" else row[width - n:] for row, n in zip(split.ids, split.lengths)]
    if name == "fasttext":
        return tokenization.inverse_document_frequency(texts, vocab_size)
    ratios = tokenization.log_count_ratios(texts, split.labels, vocab_size, num_classes)
    return ratios[:, -num_outputs(cfg, num_classes):]  # one sigmoid output scores the last (positive) class


def model_item(state: TrainState) -> dict:
    """What eval and serving need from a checkpoint: the averaged params when train.ema_decay is on,
    so every reader of a checkpoint (eval, predict, serving) uses them without knowing about the average."""
    return {"params": state.params if state.ema is None else state.ema, "rest": state.rest}


def train_item(state: TrainState) -> dict:
    """What only resuming needs; with the average on, that includes the raw params being trained."""
    item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    return item if state.ema is None else {**item, "params": state.params}


def state_from_items(model: dict, train: dict) -> TrainState:
    """The inverse of model_item and train_item."""
    if "params" in train:
        return TrainState(ema=model["params"], rest=model["rest"], **train)
    return TrainState(params=model["params"], rest=model["rest"], **train)


def check_same_average(meta: dict, decay: float) -> None:
    """Turning the parameter average on or off changes what a checkpoint holds, so a resume must keep it."""
    saved = meta.get("ema_decay")  # absent in checkpoints saved before it was recorded
    if saved is not None and bool(saved) != bool(decay):
        raise checkpoints.CheckpointError(
            f"the checkpoint was trained with train.ema_decay={saved}, this run has {decay}; resume with "
            f"--config.train.ema_decay={saved} or use a new workdir")


def parameter_counts(state: TrainState) -> dict[str, int]:
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {"trainable_params": count(state.params), "total_params": count(state.params) + count(state.rest)}


# ---------------------------------------------------------------------------------------
# Step functions.

METRIC_KEYS = ("loss_sum", "correct", "count")


def zero_metrics(mesh) -> dict[str, jax.Array]:
    return {k: jax.device_put(jnp.zeros((), jnp.float32), sharding.replicated(mesh)) for k in METRIC_KEYS}


def class_weights(cfg, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Per-class loss weights (train.class_weights): 'balanced' gives class c the weight n / (K n_c)
    over the training labels, so every class contributes equally to the loss; 'none' gives None."""
    if cfg.train.get("class_weights", "none") == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"train.class_weights 'balanced': class(es) {np.flatnonzero(counts == 0).tolist()} "
                         "have no training examples")
    return (len(labels) / (num_classes * counts)).astype(np.float32)


def make_train_step(setup: Setup, confidence_penalty: float = 0.0, class_weights: np.ndarray | None = None,
                    ema_decay: float = 0.0):
    """`class_weights` [K]: each example's loss is scaled by its class's weight (reported losses are not).
    `ema_decay` d > 0: state.ema after step t is the average of the params after steps 1..t with weights
    proportional to d^(t-s), i.e. the debiased exponential moving average, so the initial params get no weight."""
    graphdef, tx = setup.graphdef, setup.tx

    def train_step(state: TrainState, batch: dict, sums: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            # copy=True: fresh Variables in this trace, so BatchNorm may update its statistics.
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            with sharding.activation_rules(setup.mesh, setup.mesh_config):
                logits = model(batch["ids"], batch["mask"], deterministic=False, rngs=nnx.Rngs(dropout=key))
            losses = per_example_loss(logits, batch["label"], confidence_penalty) * batch["weight"]
            scaled = losses if class_weights is None else losses * jnp.asarray(class_weights)[batch["label"]]
            loss = jnp.sum(scaled) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (logits, losses, rest)

        (_, (logits, losses, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema_decay:  # e_t = e_(t-1) + (1 - d) / (1 - d^t) (p_t - e_(t-1)); e_1 = p_1
            rate = (1 - ema_decay) / (1 - ema_decay ** (state.step + 1).astype(jnp.float32))
            ema = jax.tree.map(lambda e, p: e + rate.astype(e.dtype) * (p - e), state.ema, params)
        correct = (predictions(logits) == batch["label"]) * batch["weight"]
        sums = {"loss_sum": sums["loss_sum"] + jnp.sum(losses), "correct": sums["correct"] + jnp.sum(correct),
                "count": sums["count"] + jnp.sum(batch["weight"])}
        return state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state, ema=ema), sums

    metric_sharding = {k: sharding.replicated(setup.mesh) for k in METRIC_KEYS}
    return jax.jit(train_step, in_shardings=(setup.state_sharding, setup.batch_sharding, metric_sharding),
                   out_shardings=(setup.state_sharding, metric_sharding), donate_argnums=(0, 2))


def make_predict_step(setup: Setup, param_sharding, rest_sharding):
    """Jitted (params, rest, ids, mask) -> class probabilities, replicated on every device."""
    graphdef = setup.graphdef

    def predict(params, rest, ids, mask):
        with sharding.activation_rules(setup.mesh, setup.mesh_config):
            return probabilities(nnx.merge(graphdef, params, rest)(ids, mask, deterministic=True))

    return jax.jit(predict, in_shardings=(param_sharding, rest_sharding, setup.batch_sharding,
                                          setup.batch_sharding),
                   out_shardings=sharding.replicated(setup.mesh))


def predict_probabilities(predict_step, params, rest, batches: input_pipeline.Batches, setup: Setup,
                          progress: str | None = None) -> np.ndarray:
    """Probabilities [N, K] for a whole split, row i for example i (batch order may differ)."""
    out = None
    for indices in tqdm(batches.order(0), desc=progress, disable=progress is None or jax.process_index() != 0,
                        leave=False, mininterval=2):
        batch = batches.batch(indices)
        arrays = sharding.put_batch({"ids": batch["ids"], "mask": batch["mask"]}, setup.batch_sharding)
        probs = np.asarray(predict_step(params, rest, arrays["ids"], arrays["mask"]))
        if out is None:
            out = np.zeros((len(batches.split), probs.shape[-1]), np.float32)
        out[indices[indices >= 0]] = probs[indices >= 0]
    return out


# ---------------------------------------------------------------------------------------
# Data for a run.

LABELS_FILE = "labels.json"


def prepare_data(cfg, workdir: pathlib.Path, *, fit_tokenizer: bool):
    """Loads the dataset and the run's tokenizer (fitted on train and saved, or reloaded).

    With `data.inputs = "backbone_features"` the "tokens" are a frozen backbone's cached
    features and the returned tokenizer only reports their width (see verbalizer.py).
    """
    if cfg.data.get("inputs", "tokens") == "backbone_features":
        from sentiment_jax import verbalizer

        return verbalizer.prepare_data(cfg, workdir)
    dataset = data_lib.load_dataset(cfg.data)
    if fit_tokenizer:  # every process syncs: whether the file exists yet may differ between them
        if jax.process_index() == 0 and not (workdir / tokenization.TOKENIZER_FILE).is_file():
            tokenization.build(cfg.data.tokenizer, dataset.splits["train"].texts).save(workdir)
        distributed.sync("tokenizer")
    tokenizer = tokenization.load(workdir)
    encoded = input_pipeline.encode_splits(dataset, tokenizer, cfg.data, workdir)
    if jax.process_index() == 0:  # so inference needs only the workdir (an old run gets it from one eval)
        (workdir / LABELS_FILE).write_text(json.dumps(list(dataset.label_names)))
    return dataset, tokenizer, encoded


def make_batches(cfg, split: input_pipeline.Encoded, *, train: bool, batch_size: int | None = None):
    return input_pipeline.Batches(
        split, batch_size or (cfg.train.batch_size if train else cfg.train.eval_batch_size),
        padding=cfg.data.padding, shuffle=train, seed=cfg.seed, bucket_width=cfg.data.bucket_width,
        process_index=jax.process_index(), process_count=jax.process_count())


def save_config(cfg, workdir: pathlib.Path) -> None:
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    file = workdir / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; pass --config or a workdir written by a training run")
    return ml_collections.ConfigDict(json.loads(file.read_text()))


def load_labels(workdir: pathlib.Path) -> tuple[str, ...]:
    """The class names of a run, in logit order."""
    file = workdir / LABELS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; run --mode=eval on {workdir} once to write it")
    return tuple(json.loads(file.read_text()))


# ---------------------------------------------------------------------------------------
# Train and evaluate.


def evaluate_split(cfg, setup, predict_step, params, rest, split, label_names, desc=None) -> tuple[dict, np.ndarray]:
    """(the report, the probabilities [N, K]) of one split."""
    probs = predict_probabilities(predict_step, params, rest, make_batches(cfg, split, train=False), setup, desc)
    return metrics_lib.probability_report(split.labels, probs, label_names), probs


CHOICES = {
    "data.name": lambda: sorted(data_lib.SOURCES),
    "data.inputs": lambda: ["tokens", "backbone_features"],
    "data.padding": lambda: ["pre", "post"],
    "data.truncation": lambda: ["pre", "post"],
    "data.tokenizer.kind": lambda: ["word", "ngrams", "huggingface"],
    "model.name": lambda: sorted(models.MODELS),
    "model.dtype": lambda: sorted(models.DTYPES),
    "model.lstm_backend": lambda: list(models.recurrent.BACKENDS),
    "train.loss": lambda: ["softmax", "sigmoid"],
    "train.schedule": lambda: ["cosine", "linear", "constant"],
    "train.class_weights": lambda: ["none", "balanced"],
    "model.bag_weights": lambda: ["uniform", "idf"],
    "model.bag_norm": lambda: ["l1", "l2"],
    "checkpoint.best_metric": lambda: ["accuracy", "macro_f1"],
    "pretrain.embeddings": lambda: ["none", "word2vec"],
}

# Fields added later: a run saved before them has none, and the code defaults.
OPTIONAL = {"class_weights", "bag_weights", "bag_norm", "lstm_backend", "embeddings"}


def check_config(cfg) -> None:
    """Fails in milliseconds, before any data is read, on a value that is not one of the choices."""
    for field, choices in CHOICES.items():
        value = functools.reduce(lambda c, k: c.get(k) if c is not None else None, field.split("."), cfg)
        if value is None and field.split(".")[-1] in OPTIONAL:  # a run saved before the field existed
            continue
        if value not in choices():
            raise ValueError(f"unknown {field} '{value}'; choose one of {choices()}")
    for field in ("train.epochs", "train.batch_size", "train.eval_batch_size", "data.max_length"):
        value = functools.reduce(lambda c, k: c[k], field.split("."), cfg)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if cfg.data.name == "nusax_senti":
        data_lib.nusax_train_languages(cfg.data)
    check_pretrain(cfg)
    refit = cfg.data.get("train_on_validation", False)  # absent in runs saved before it existed: off
    if not isinstance(refit, bool):
        raise ValueError(f"data.train_on_validation must be True or False, got {refit!r}")
    if cfg.eval.get("calibrate", False) and refit:
        raise ValueError("eval.calibrate fits a temperature on validation, which data.train_on_validation trains "
                         "on; turn one of them off")
    decay = cfg.train.get("ema_decay", 0.0)  # absent in runs saved before it existed: off
    if not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"train.ema_decay must be in [0, 1) (0 turns the average off), got {decay!r}")


def check_pretrain(cfg) -> None:
    p = cfg.get("pretrain")
    if p is None or p.embeddings == "none":
        return
    if cfg.data.tokenizer.kind != "word":
        raise ValueError(f"pretrain.embeddings '{p.embeddings}' needs data.tokenizer.kind 'word', "
                         f"not '{cfg.data.tokenizer.kind}'")
    for field in ("epochs", "window", "negatives", "batch_size"):
        if not isinstance(p[field], int) or p[field] < 1:
            raise ValueError(f"pretrain.{field} must be a positive integer, got {p[field]!r}")
    if not p.learning_rate > 0 or not p.subsample >= 0:
        raise ValueError(f"pretrain.learning_rate must be > 0 and pretrain.subsample >= 0 (0: no thinning), "
                         f"got {p.learning_rate!r} and {p.subsample!r}")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains (resuming from the latest checkpoint if any), keeps the best, reports on test."""
    check_config(cfg)
    metrics_lib.check_wandb(cfg.train.get("wandb_project", ""))  # training logs there; eval of the run does not
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, workdir)
    t_start = time.time()
    mesh = sharding.make_mesh(cfg.mesh)
    dataset, tokenizer, encoded = prepare_data(cfg, workdir, fit_tokenizer=True)
    train_batches = make_batches(cfg, encoded["train"], train=True)
    steps_per_epoch = len(train_batches)
    total_steps = cfg.train.epochs * steps_per_epoch
    embeddings = word2vec.pretrained_embeddings(cfg, dataset.splits["train"].texts, dataset.unlabeled, tokenizer,
                                                workdir)
    state, setup = create_state(cfg, mesh, tokenizer.vocab_size, dataset.num_classes, total_steps,
                                fixed_feature_weights(cfg, encoded["train"], tokenizer.vocab_size,
                                                      dataset.num_classes), embeddings)
    counts = parameter_counts(state)
    is_main = jax.process_index() == 0
    refit = cfg.data.get("train_on_validation", False)  # train already holds the validation texts (data.py)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, wandb_project=cfg.train.get("wandb_project", ""),
                                      config=cfg.to_dict())
    writer.hparams(cfg.to_dict(), ["val/accuracy", "val/macro_f1", "test/accuracy", "test/macro_f1"])
    schedule = learning_rate(cfg, total_steps)
    logging.info("data: %s", {s: len(v) for s, v in encoded.items()})
    logging.info("parameters: %s; mesh %s", counts, dict(mesh.shape))
    if is_main:
        print(f"{cfg.model.name}: {counts['trainable_params']:,} trainable / {counts['total_params']:,} total "
              f"parameters; {len(jax.devices())} devices, mesh {dict(mesh.shape)}", flush=True)

    mngr = checkpoints.manager(workdir, cfg.checkpoint)
    meta = {"epoch_sums": {k: 0.0 for k in METRIC_KEYS}, "epoch_seconds": 0.0}
    if mngr.latest_step() is not None:
        step = mngr.latest_step()
        meta = checkpoints.restore(mngr, step, meta=None)["meta"]  # checked first: it names what differs
        checkpoints.check_data_position(meta, cfg.train.batch_size)
        check_same_average(meta, cfg.train.get("ema_decay", 0.0))
        restored = checkpoints.restore(mngr, step, model=checkpoints.abstract(model_item(state)),
                                       train=checkpoints.abstract(train_item(state)))
        state = state_from_items(restored["model"], restored["train"])
        logging.info("resumed from step %d", step)
        if is_main:
            print(f"resuming from checkpoint step {step}", flush=True)

    train_step = make_train_step(setup, cfg.train.get("confidence_penalty", 0.0),
                                 class_weights(cfg, encoded["train"].labels, dataset.num_classes),
                                 cfg.train.get("ema_decay", 0.0))
    predict_step = make_predict_step(setup, setup.state_sharding.params, setup.state_sharding.rest)
    step = int(state.step)
    writer.write(step, counts, kind="params")

    def checkpoint(step, epoch, index, sums, seconds, val=None):
        checkpoints.save(mngr, step, model_item(state), train_item(state),
                         {"epoch": epoch, "batch_index": index, "epoch_seconds": seconds,
                          "ema_decay": cfg.train.get("ema_decay", 0.0),
                          **checkpoints.data_position(cfg.train.batch_size),
                          "epoch_sums": {k: float(v) for k, v in jax.device_get(sums).items()}},
                         metrics=val)

    first_epoch, first_index = divmod(step, steps_per_epoch)
    for epoch in range(first_epoch, cfg.train.epochs):
        start = first_index if epoch == first_epoch else 0
        sums = zero_metrics(mesh)
        prior_seconds = 0.0
        if start:  # resumed mid-epoch: continue the epoch's running sums and clock
            sums = {k: jax.device_put(jnp.float32(meta["epoch_sums"][k]), sharding.replicated(mesh))
                    for k in METRIC_KEYS}
            prior_seconds = meta["epoch_seconds"]
        t0 = time.time()
        bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not is_main, mininterval=1, dynamic_ncols=True)
        seen, t_log, logged = 0, time.time(), jax.device_get(sums)
        for index, batch in train_batches.epoch(epoch, start):
            state, sums = train_step(state, sharding.put_batch(batch, setup.batch_sharding), sums)
            step += 1
            seen += len(batch["label"]) * jax.process_count()
            bar.update(1)
            if step % cfg.train.log_every == 0:
                host = jax.device_get(sums)
                rate = seen / (time.time() - t_log)
                step_loss = (host["loss_sum"] - logged["loss_sum"]) / max(host["count"] - logged["count"], 1)
                seen, t_log, logged = 0, time.time(), host
                bar.set_postfix(loss=f"{host['loss_sum'] / host['count']:.4f}",
                                acc=f"{host['correct'] / host['count']:.4f}", ex_s=f"{rate:.0f}")
                writer.write(step, {"train/running_loss": host["loss_sum"] / host["count"],
                                    "train/step_loss": step_loss, "train/examples_per_s": rate,
                                    "train/learning_rate": schedule(step - 1) if callable(schedule) else schedule})
            at_epoch_end = index + 1 == steps_per_epoch
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and not at_epoch_end:
                checkpoint(step, epoch, index + 1, sums, prior_seconds + time.time() - t0)
        bar.close()
        host = jax.device_get(sums)
        seconds = prior_seconds + time.time() - t0
        scalars = {"train/loss": host["loss_sum"] / host["count"], "train/accuracy": host["correct"] / host["count"]}
        val = None  # what the checkpoint is ranked by; a refit trained on validation, so it has none
        if not refit:
            weights = model_item(state)  # the average when on: it picks the best checkpoint
            report, _ = evaluate_split(cfg, setup, predict_step, weights["params"], weights["rest"],
                                       encoded["validation"], dataset.label_names, desc="validation")
            writer.confusion(step, "val", report)
            val = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}
            scalars.update({"val/loss": report["loss"], **{f"val/{k}": v for k, v in val.items()}})
        scalars.update({"epoch_seconds": seconds, "train/examples_per_s": host["count"] / seconds})
        writer.write(step, scalars, kind="epoch", epoch=epoch + 1)
        if is_main:
            print(f"epoch {epoch + 1}: " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()), flush=True)
        checkpoint(step, epoch + 1, 0, zero_metrics(mesh), 0.0, val=val)
    mngr.wait_until_finished()

    # Report on test with the best checkpoint (a refit's last), exactly as an eval-only run would.
    result = evaluate(cfg, workdir, split="test", which="latest" if refit else "best", mngr=mngr, setup=setup,
                      state=state, encoded=encoded, dataset=dataset)
    result["wall_seconds"] = time.time() - t_start
    result.update(counts)
    writer.write(step, {"test/accuracy": result["accuracy"], "test/macro_f1": result["macro_f1"]}, kind="test")
    writer.confusion(step, "test", result)
    writer.close()
    if is_main:
        (workdir / "result.json").write_text(json.dumps(result, indent=2))
    mngr.close()
    return result


def evaluate(cfg, workdir: str | pathlib.Path, *, split: str = "test", which: str | int = "best",
             mngr=None, setup: Setup | None = None, state: TrainState | None = None, encoded=None,
             dataset=None) -> dict:
    """Eval-only: restores the params of one checkpoint on the current devices and reports a split."""
    check_config(cfg)
    workdir = pathlib.Path(workdir)
    tokenizer = None
    if mngr is None and not (workdir / "checkpoints").is_dir():
        raise checkpoints.CheckpointError(f"no checkpoints in {workdir}; train first or fix --workdir")
    if encoded is None:
        dataset, tokenizer, encoded = prepare_data(cfg, workdir, fit_tokenizer=False)
    if split not in encoded:
        raise ValueError(f"unknown split '{split}'; choose one of {sorted(encoded)}")
    if state is None:
        mesh = sharding.make_mesh(cfg.mesh)
        vocab = (tokenizer or tokenization.load(workdir)).vocab_size
        state, setup = create_state(cfg, mesh, vocab, dataset.num_classes, total_steps=1)
    own_manager = mngr is None
    if own_manager:
        mngr = checkpoints.manager(workdir, cfg.checkpoint, read_only=True)
    step = checkpoints.resolve_step(mngr, which)
    model = checkpoints.restore(mngr, step, model=checkpoints.abstract(model_item(state)))["model"]
    params, rest = model["params"], model["rest"]
    if own_manager:
        mngr.close()
    predict_step = make_predict_step(setup, setup.state_sharding.params, setup.state_sharding.rest)
    report, probs = evaluate_split(cfg, setup, predict_step, params, rest, encoded[split], dataset.label_names,
                                   desc=f"eval {split}")
    report.update({"split": split, "checkpoint_step": int(step), "checkpoint": str(which)})
    validation = None
    if cfg.eval.get("calibrate", False):  # absent in runs saved before it existed: off
        _, val_probs = evaluate_split(cfg, setup, predict_step, params, rest, encoded["validation"],
                                      dataset.label_names)
        validation = (val_probs, encoded["validation"].labels)
    if jax.process_index() == 0:
        report.update(metrics_lib.test_time_additions(probs, encoded[split].labels, dataset.label_names, workdir,
                                                      f"{split}_{which}", validation))
        (workdir / f"eval_{split}_{which}.json").write_text(json.dumps(report, indent=2))
        print(metrics_lib.format_report(report, dataset.label_names), flush=True)
    return report
