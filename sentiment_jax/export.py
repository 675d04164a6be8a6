"""`python -m sentiment_jax.export --workdir=RUN --output=DIR`: a trained run as a self-contained serving folder.

A run needs this package's training code, its Orbax checkpoints and the model classes to
predict; the folder written here needs only JAX, NumPy and the tokenizer (`exported.py`):

  manifest.json          model kind and config, labels, test metrics, input shapes, versions
  forward_<L>.jaxexport  the forward pass (weights, ids, mask -> probabilities) for length
                         bucket L, serialized StableHLO with a symbolic batch dimension
  params.safetensors     the weights, an argument of every program
  encoder.json (+ tokenizer.json), labels.json

One program per length bucket rather than a symbolic length: the bag models count repeated
ids with a sort and a binary search, whose trip count must be known when exporting. The
weights travel beside the programs rather than inside them as constants, so the programs
stay tens of kilobytes whatever the vocabulary, and all buckets share one copy of the
weights. A verbalizer's frozen backbone, pooling, window average and head are one program.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import pathlib
import platform
import shutil
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sentiment_jax
from sentiment_jax import buckets, exported, runs, steps
from sentiment_jax._extras import MissingExtra, require

save_file = require("safetensors.numpy", "export", program=__name__ == "__main__").save_file
require("flatbuffers", "export", program=__name__ == "__main__")  # what jax.export writes programs with

LIBRARIES = ("jax", "jaxlib", "flax", "numpy", "safetensors", "flatbuffers", "tokenizers")


def flat_weights(state) -> tuple[dict[str, np.ndarray], Callable]:
    """A pytree of arrays as {"a/b/c": array} (what safetensors and the program's signature hold) and its inverse."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]
    weights = {n: np.asarray(x) for n, (_, x) in zip(names, leaves)}
    return weights, lambda flat: jax.tree.unflatten(treedef, [flat[n] for n in names])


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "sentiment_jax": sentiment_jax.__version__}
    for lib in LIBRARIES:
        try:
            found[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def export_run(workdir: str | pathlib.Path, output: str | pathlib.Path, *, checkpoint: str | int = "best",
               platforms: Sequence[str] | None = None) -> pathlib.Path:
    """Writes the export folder of one checkpoint of a run; returns its path."""
    return export(runs.load(workdir, checkpoint), output, platforms=platforms)


@dataclasses.dataclass
class Program:
    """What an export holds besides the labels: fn(weights, ids, mask) -> probabilities, the weights, and
    how `exported.py` turns texts into ids (`inputs`, written to the manifest, and the tokenizer)."""

    fn: Callable
    weights: dict[str, np.ndarray]
    inputs: dict
    tokenizer: Any
    between: tuple[int, ...] = ()  # ids dimensions between the batch and the length (the verbalizer's windows)


def token_program(run: runs.Run) -> Program:
    """A token model on ids and mask [batch, length]."""
    weights, unflatten = flat_weights({"params": run.params, "rest": run.rest})
    forward = steps.forward_fn(run.graphdef)  # no mesh: the programs run on one device

    def fn(weights, ids, mask):
        state = unflatten(weights)
        return forward(state["params"], state["rest"], ids, mask)

    d = run.cfg.data
    return Program(fn, weights, {"kind": "tokens", "padding": d.padding, "truncation": d.truncation}, run.encoder)


def backbone_program(run: runs.Run) -> Program:
    """A verbalizer: backbone, pooling, the average over windows and the head on ids and mask
    [batch, windows, length] (`exported.WindowInputs`)."""
    extractor, b, d = run.encoder.extractor(), run.cfg.backbone, run.cfg.data
    weights, unflatten = flat_weights({"backbone": extractor.state, "params": run.params, "rest": run.rest})
    forward = steps.forward_fn(run.graphdef)

    def fn(weights, ids, mask):
        state = unflatten(weights)
        batch, windows, length = ids.shape
        pooled = extractor.pure_features(state["backbone"], ids.reshape(-1, length),
                                         mask.reshape(-1, length))[b.pooling]
        size = mask.sum(-1).astype(jnp.float32)  # a window weighs its length, as in verbalizer.average_windows
        pooled = jnp.where(size.reshape(-1, 1) > 0, pooled, 0.0).reshape(batch, windows, -1)  # no NaN of empties
        total = size.sum(1, keepdims=True)
        features = (pooled * size[..., None]).sum(1) / jnp.maximum(total, 1e-12)
        return forward(state["params"], state["rest"], features, jnp.broadcast_to(total > 0, features.shape))

    inputs = {"kind": "windows", "template": b.template, "windows": b.windows, "max_length": d.max_length,
              "truncation": d.truncation}
    return Program(fn, weights, inputs, run.encoder.backbone.tokenizer, (b.windows,))


def export(run: runs.Run, output: str | pathlib.Path, *, platforms: Sequence[str] | None = None) -> pathlib.Path:
    """Writes the export folder of a restored run; returns its path."""
    output = pathlib.Path(output)
    if output.exists() and not exported.is_export(output) and any(output.iterdir()):
        raise ValueError(f"--output={output} exists and is not an export folder; choose a new folder")
    run = runs.portable(run)  # no platform's custom calls in a program meant to run anywhere
    program = (backbone_program if run.encoder.kind == "backbone_features" else token_program)(run)
    lengths = buckets.length_buckets(run.cfg.data.max_length)
    batch = jax.export.symbolic_shape("batch")[0]
    specs = {n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in program.weights.items()}
    platforms = tuple(platforms or (jax.default_backend(),))
    tmp = output.with_name(f"{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for length in lengths:
            ids, mask = (jax.ShapeDtypeStruct((batch, *program.between, length), t) for t in (jnp.int32, jnp.bool_))
            serialized = jax.export.export(jax.jit(program.fn), platforms=platforms)(specs, ids, mask).serialize()
            (tmp / exported.program_file(length)).write_bytes(serialized)
        save_file(program.weights, tmp / exported.PARAMS)
        runs.save_encoder(program.tokenizer, tmp)
        runs.save_labels(run.label_names, tmp)
        shape = ["batch", *program.between, "length"]
        manifest = {
            "format": exported.FORMAT, "version": exported.VERSION,
            "model": run.cfg.model.to_dict(), "labels": list(run.label_names), "checkpoint_step": run.step,
            "source_run": run.workdir.name, "metrics": runs.read_result(run.workdir),
            "inputs": {**program.inputs, "ids": {"shape": shape, "dtype": "int32"},
                       "mask": {"shape": shape, "dtype": "bool"}, "lengths": list(lengths),
                       "batch_sizes": list(buckets.BATCH_SIZES)},
            "outputs": {"probabilities": {"shape": ["batch", len(run.label_names)], "dtype": "float32"}},
            "platforms": list(platforms), "versions": versions(),
        }
        if run.encoder.kind == "backbone_features":
            manifest["backbone"] = {k: v for k, v in run.encoder.spec().items() if k != "kind"}
        (tmp / exported.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "The trained run to export.", required=True)
    flags.DEFINE_string("output", None, "The folder to write (replaced if it holds an earlier export).",
                        required=True)
    flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
    flags.DEFINE_list("platforms", None, "Platforms to compile for, e.g. cpu,cuda,tpu (default: this machine's).")


def main(argv) -> None:
    del argv
    from absl import flags, logging

    from sentiment_jax import checkpoints

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        output = export_run(FLAGS.workdir, FLAGS.output, checkpoint=FLAGS.checkpoint, platforms=FLAGS.platforms)
    except (checkpoints.CheckpointError, MissingExtra, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {FLAGS.workdir} to {output}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
