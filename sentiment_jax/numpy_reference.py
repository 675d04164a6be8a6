"""The recurrent classifiers written again in plain NumPy, to check a trained Flax model against.

Nothing here is shared with `models/`: the cells are the textbook equations, time is a
Python loop, padding is handled by not updating the state, and everything runs in float64.
If a checkpoint gives the same predictions here as in Flax, the Flax model computes what
the equations say (and a reader can follow the model line by line without JAX).

  python -m sentiment_jax.numpy_reference --workdir=runs/lstm --split=test
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

from sentiment_jax import data as data_lib
from sentiment_jax import input_pipeline, runs, steps, train


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lstm_step(p, x_t, h, c):
    z = x_t @ p["input_kernel"] + p["bias"] + h @ p["recurrent_kernel"]
    i, f, g, o = np.split(z, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * np.tanh(c), c


def gru_step(p, x_t, h, _):
    """PyTorch's GRU: the reset gate multiplies the recurrent part of the candidate, bias included."""
    xr, xz, xn = np.split(x_t @ p["input_kernel"] + p["bias"], 3, axis=-1)
    hr, hz, hn = np.split(h @ p["recurrent_kernel"] + p["recurrent_bias"], 3, axis=-1)
    r, z = sigmoid(xr + hr), sigmoid(xz + hz)
    n = np.tanh(xn + r * hn)
    return (1 - z) * n + z * h, None


def rnn_step(p, x_t, h, _):
    return np.tanh(x_t @ p["input_kernel"] + p["bias"] + h @ p["recurrent_kernel"]), None


STEPS = {"lstm": lstm_step, "gru": gru_step, "rnn": rnn_step}


def run_direction(step, p, x, mask, reverse):
    """x [B, T, F] -> (outputs [B, T, H] with zeros on padding, final h [B, H])."""
    batch, length, _ = x.shape
    hidden = p["recurrent_kernel"].shape[0]
    h, c = np.zeros((batch, hidden)), np.zeros((batch, hidden))
    outputs = np.zeros((batch, length, hidden))
    for t in (reversed(range(length)) if reverse else range(length)):
        new_h, new_c = step(p, x[:, t], h, c)
        real = mask[:, t, None]
        h = np.where(real, new_h, h)  # padding leaves the state alone
        if new_c is not None:
            c = np.where(real, new_c, c)
        outputs[:, t] = np.where(real, h, 0.0)
    return outputs, h


def pool(outputs, mask, final, params, how):
    """The text vector from the last layer: final state, mean/max over real steps, or attention."""
    m = mask[..., None]
    if how == "last":
        return final
    if how == "mean":
        return (outputs * m).sum(1) / np.maximum(m.sum(1), 1)
    if how == "max":
        pooled = np.where(m, outputs, -np.inf).max(1)
        return np.where(np.isfinite(pooled), pooled, 0.0)
    if how == "mean_max":
        return np.concatenate([pool(outputs, mask, final, params, "mean"),
                               pool(outputs, mask, final, params, "max")], axis=-1)
    if how == "attention":  # score_t = v . tanh(W h_t + b), softmax over real steps
        a = params["attention"]
        scores = (np.tanh(outputs @ a["proj"]["kernel"] + a["proj"]["bias"]) @ a["score"]["kernel"])[..., 0]
        top = np.where(mask, scores, -np.inf).max(1, keepdims=True)
        w = np.where(mask, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
        w = w / np.maximum(w.sum(1, keepdims=True), 1e-300)  # an empty text pools to zeros
        return (w[..., None] * outputs).sum(1)
    raise ValueError(f"the NumPy reference has no pooling '{how}'")


def forward(params: dict, model_cfg, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits [B, K] of a RecurrentClassifier from its parameters as nested NumPy dicts."""
    if model_cfg.name not in STEPS:
        raise ValueError(f"the NumPy reference covers {sorted(STEPS)}, not model '{model_cfg.name}'")
    step = STEPS[model_cfg.name]
    x = params["embed"]["embedding"][ids]
    final = None
    for i in range(len(params["layers"])):
        layer = params["layers"][i]
        out, final = run_direction(step, layer["forward"], x, mask, reverse=False)
        if layer.get("backward"):  # reads each text last-to-first; its final state is at the first word
            out_b, final_b = run_direction(step, layer["backward"], x, mask, reverse=True)
            out, final = np.concatenate([out, out_b], -1), np.concatenate([final, final_b], -1)
        x = out
    x = pool(x, mask, final, params, model_cfg.pooling)
    for i in range(len(params.get("head", {}))):
        x = np.maximum(x @ params["head"][i]["kernel"] + params["head"][i]["bias"], 0.0)
    return x @ params["out"]["kernel"] + params["out"]["bias"]


def probabilities(logits: np.ndarray) -> np.ndarray:
    if logits.shape[-1] == 1:  # one sigmoid logit for the positive class
        p = sigmoid(logits[:, 0])
        return np.stack([1 - p, p], -1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_params(params: nnx.State) -> dict:
    """A checkpoint's parameters as nested dicts of float64 arrays (list layers keyed 0, 1, ...)."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(params))


def compare(workdir: str | pathlib.Path, split: str = "test", which: str | int = "best",
            max_examples: int = 0) -> dict:
    """Predictions of the Flax model and of this file on one split, from the same checkpoint."""
    workdir = pathlib.Path(workdir)
    run = runs.load(workdir, which)
    cfg = run.cfg
    encoded = train.encode_splits(cfg, data_lib.load_dataset(cfg.data), run.encoder, workdir)
    if split not in encoded:
        raise ValueError(f"unknown split '{split}'; choose one of {sorted(encoded)}")
    data = encoded[split]
    if max_examples:
        data = input_pipeline.Encoded(data.ids[:max_examples], data.lengths[:max_examples],
                                      data.labels[:max_examples])
    batches = train.make_batches(cfg, data, train=False)

    t0 = time.time()
    flax_probs = steps.predict_probabilities(run.predict_step, run.params, run.rest, batches, run.batch_sharding)
    flax_seconds = time.time() - t0

    t0 = time.time()
    params = numpy_params(run.params)
    numpy_probs = np.zeros_like(flax_probs, np.float64)
    for indices in batches.order(0):  # the same batches (and bucket widths) the Flax model saw
        batch, real = batches.batch(indices), indices >= 0
        logits = forward(params, cfg.model, batch["ids"][real], batch["mask"][real])
        numpy_probs[indices[real]] = probabilities(logits)
    numpy_seconds = time.time() - t0

    agree = flax_probs.argmax(-1) == numpy_probs.argmax(-1)
    return {
        "split": split, "checkpoint_step": run.step, "num_examples": len(data),
        "agreement": float(agree.mean()), "disagreements": int((~agree).sum()),
        "max_probability_difference": float(np.abs(flax_probs - numpy_probs).max()),
        "flax_accuracy": float((flax_probs.argmax(-1) == data.labels).mean()),
        "numpy_accuracy": float((numpy_probs.argmax(-1) == data.labels).mean()),
        "flax_seconds": flax_seconds, "numpy_seconds": numpy_seconds,
    }


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so the modules can be imported together."""
    flags.DEFINE_string("workdir", None, "A trained run of a recurrent model (lstm, gru, rnn).", required=True)
    flags.DEFINE_string("split", "test", "The split to compare on.")
    flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
    flags.DEFINE_integer("max_examples", 0, ">0: only the first N examples of the split.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    try:
        report = compare(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint, FLAGS.max_examples)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = pathlib.Path(FLAGS.workdir) / f"numpy_reference_{FLAGS.split}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"{report['num_examples']} {report['split']} examples: prediction agreement "
          f"{100 * report['agreement']:.2f}% ({report['disagreements']} differ), max probability difference "
          f"{report['max_probability_difference']:.2e}; accuracy Flax {report['flax_accuracy']:.4f}, "
          f"NumPy {report['numpy_accuracy']:.4f}; written to {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
