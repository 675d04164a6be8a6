"""Command line: `python -m sentiment_jax.main --config=configs/lstm.py --workdir=DIR [--mode=eval]`.

Predict: `python -m sentiment_jax.main --mode=predict --workdir=DIR [--input=FILE] [TEXT ...]`.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: FILE.py:VARIANT.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config, tokenizer, checkpoints, metrics.", required=True)
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                  "train (resumes if DIR has checkpoints), eval, or predict (JSON lines to stdout).")
flags.DEFINE_string("split", None, "eval: the split to report (default config.eval.split).")
flags.DEFINE_string("checkpoint", None, "eval/predict: best, latest or a step number (default config.eval.checkpoint).")
flags.DEFINE_string("input", None, "predict: .csv, .jsonl or one-text-per-line file, or - for stdin "
                    "(default: the texts given as arguments, else stdin).")
flags.DEFINE_string("text_field", "text", "predict: the CSV column or JSON key holding the text.")
flags.DEFINE_bool("plots", True, "train: end by drawing the training curves and the test confusion matrix "
                  "as PNGs in the workdir (sentiment_jax.plots).")
flags.DEFINE_integer("cpu_devices", None, "Split the CPU into this many single-threaded devices: one per core "
                     "is fastest for the LSTM; more simulate a bigger mesh.")
# Multi-process runs; on TPU VMs and under SLURM these are detected and need not be given.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, e.g. 10.0.0.2:8476.")
flags.DEFINE_integer("num_processes", None, "Processes in the run (one per host, or per GPU).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")


def main(argv):
    if not FLAGS["verbosity"].present:  # orbax is chatty at INFO; our progress goes to stdout
        logging.set_verbosity(logging.WARNING)
    from sentiment_jax import exported

    if FLAGS.mode == "predict" and exported.is_export(FLAGS.workdir):
        return predict_export(argv)
    import jax

    from sentiment_jax import checkpoints, cpu_kernels, data, distributed, predict, runs, sharding, train
    from sentiment_jax._extras import MissingExtra

    if FLAGS.cpu_devices:
        sharding.use_cpu_devices(FLAGS.cpu_devices)

    workdir = pathlib.Path(FLAGS.workdir)
    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        if jax.process_count() > 1:
            logging.warning("%s", distributed.describe())
        cfg = FLAGS.config if FLAGS.config is not None else runs.load_config(workdir)
        if FLAGS.mode == "train":
            if FLAGS.config is None:
                raise ValueError("--config is required to train")
            train.train_and_evaluate(cfg, workdir)
            if FLAGS.plots and jax.process_index() == 0:
                from sentiment_jax import plots

                print("figures: " + ", ".join(str(f) for f in plots.run_figures(workdir)), flush=True)
        elif FLAGS.mode == "predict":
            texts = argv[1:] or predict.read_texts(FLAGS.input, FLAGS.text_field)
            predict.predict(workdir, texts, checkpoint=FLAGS.checkpoint or cfg.eval.checkpoint)
        else:
            # The run's own config; --config, if given, only places it on another mesh and says whether
            # to fit a temperature (eval.calibrate), neither of which changes the model.
            given = FLAGS.config is not None
            train.evaluate(workdir, split=FLAGS.split or cfg.eval.split, which=FLAGS.checkpoint or cfg.eval.checkpoint,
                           mesh_config=FLAGS.config.mesh if given else None,
                           calibrate=FLAGS.config.eval.calibrate if given else None)
    except (data.DataError, checkpoints.CheckpointError, cpu_kernels.KernelError, MissingExtra, FileNotFoundError,
            ValueError, KeyError) as e:
        logging.debug("error details", exc_info=True)
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        logging.set_verbosity(logging.FATAL)  # nothing from the libraries after the one line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def predict_export(argv):
    """--mode=predict on an export folder: no config, checkpoints or training code (nor their imports)."""
    from sentiment_jax import predict
    from sentiment_jax._extras import MissingExtra

    try:
        predict.predict(pathlib.Path(FLAGS.workdir), argv[1:] or predict.read_texts(FLAGS.input, FLAGS.text_field))
    except (MissingExtra, FileNotFoundError, ValueError) as e:  # DataError and ExportError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv):
    """absl parsing, with config mistakes (unknown field, bad variant) reported as one line."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        print(f"error: unknown config field {str(e).strip(chr(34))} in {overrides}; see config_base.py "
              "for the fields", file=sys.stderr)
        sys.exit(2)
    except (flags.Error, TypeError, ValueError) as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: {message.strip()}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """The `sentiment-jax` command, the same as `python -m sentiment_jax.main`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
