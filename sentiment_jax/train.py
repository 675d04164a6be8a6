"""The train loop, and eval-only over the same restore path as every other reader of a run.

Each concern has its own file: losses.py, optimizer.py, state.py (the state, its
initialisation and checkpoint items), steps.py (the jitted steps), runs.py (everything
in the workdir). A model that needs statistics of the training data or pretrained
embeddings asks for them through its own `from_data` hook (models/from_data.py).
"""

from __future__ import annotations

import contextlib
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from sentiment_jax import checkpoints
from sentiment_jax import config_base
from sentiment_jax import data as data_lib
from sentiment_jax import distributed
from sentiment_jax import input_pipeline
from sentiment_jax import losses
from sentiment_jax import metrics as metrics_lib
from sentiment_jax import optimizer
from sentiment_jax import runs
from sentiment_jax import sharding
from sentiment_jax import state as state_lib
from sentiment_jax import steps
from sentiment_jax import word2vec
from sentiment_jax.models.from_data import TrainingData


def encode_splits(cfg, dataset: data_lib.Dataset, encoder, workdir: pathlib.Path) -> dict:
    """Every split as model inputs: token ids (cached in the workdir) or backbone features (cached per recipe)."""
    if encoder.kind == "backbone_features":
        return encoder.encode_splits(dataset)
    return input_pipeline.encode_splits(dataset, encoder, cfg.data, workdir)


def make_batches(cfg, split: input_pipeline.Encoded, *, train: bool, batch_size: int | None = None):
    return input_pipeline.Batches(
        split, batch_size or (cfg.train.batch_size if train else cfg.train.eval_batch_size),
        padding=cfg.data.padding, shuffle=train, seed=cfg.seed, bucket_width=cfg.data.bucket_width,
        process_index=jax.process_index(), process_count=jax.process_count())


def evaluate_split(cfg, predict_step, params, rest, split, label_names, batch_sharding,
                   desc=None) -> tuple[dict, np.ndarray]:
    """(the report, the probabilities [N, K]) of one split."""
    probs = steps.predict_probabilities(predict_step, params, rest, make_batches(cfg, split, train=False),
                                        batch_sharding, desc)
    return metrics_lib.probability_report(split.labels, probs, label_names), probs


def run_files(cfg, workdir: pathlib.Path, dataset: data_lib.Dataset, resume: bool):
    """The run's input encoder: the saved one on a resume, else a new one, saved with the labels."""
    if resume:
        saved = runs.load_labels(workdir)
        if saved != tuple(dataset.label_names):
            raise ValueError(f"{workdir} was trained on classes {list(saved)}, this data has "
                             f"{list(dataset.label_names)}; train into a new workdir")
        encoder = runs.load_encoder(workdir, cfg)
    else:
        encoder = runs.create_encoder(cfg, dataset.splits["train"].texts)
    if jax.process_index() == 0 and not resume:
        runs.save_labels(dataset.label_names, workdir)
        runs.save_encoder(encoder, workdir)
    distributed.sync("run files")
    return encoder


def train_and_evaluate(cfg, workdir: str | pathlib.Path) -> dict:
    """Trains (resuming from the latest checkpoint if any), keeps the best, reports on test."""
    config_base.check_config(cfg)
    metrics_lib.check_wandb(cfg.train.wandb_project)  # training logs there; eval of the run does not
    workdir = pathlib.Path(workdir)
    resume = runs.has_checkpoints(workdir)
    meta, step = {"epoch_sums": {k: 0.0 for k in steps.METRIC_KEYS}, "epoch_seconds": 0.0}, 0
    if resume:  # every check that can refuse a resume, the classes' in run_files too, before anything is written
        runs.check_resume(workdir, cfg)
        with checkpoints.reader(workdir, cfg.checkpoint) as mngr:
            step = mngr.latest_step()
            meta = checkpoints.restore(mngr, step, meta=None)["meta"]
        checkpoints.check_data_position(meta, cfg.train.batch_size)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0 and not resume:  # first, so a run that fails on its data still says what it was
        runs.save_config(cfg, workdir)
    t_start = time.time()
    mesh = sharding.make_mesh(cfg.mesh)
    dataset = data_lib.load_dataset(cfg.data)
    encoder = run_files(cfg, workdir, dataset, resume)
    encoded = encode_splits(cfg, dataset, encoder, workdir)
    train_batches = make_batches(cfg, encoded["train"], train=True)
    steps_per_epoch = len(train_batches)
    total_steps = cfg.train.epochs * steps_per_epoch
    train_split = encoded["train"]
    data = TrainingData(train_split.ids, train_split.lengths, train_split.labels, cfg.data.padding,
                        encoder.vocab_size, dataset.num_classes, losses.num_outputs(cfg, dataset.num_classes),
                        word2vec.pretrained_embeddings(cfg, dataset.splits["train"].texts, dataset.unlabeled,
                                                       encoder, workdir))
    state, setup = state_lib.create_state(cfg, mesh, encoder.vocab_size, dataset.num_classes, total_steps, data)
    counts = state_lib.parameter_counts(state)
    is_main = jax.process_index() == 0
    refit = cfg.data.train_on_validation  # train already holds the validation texts (data.py)
    logging.info("data: %s", {s: len(v) for s, v in encoded.items()})
    logging.info("parameters: %s; mesh %s", counts, dict(mesh.shape))
    if is_main:
        print(f"{cfg.model.name}: {counts['trainable_params']:,} trainable / {counts['total_params']:,} total "
              f"parameters; {len(jax.devices())} devices, mesh {dict(mesh.shape)}", flush=True)

    with contextlib.ExitStack() as stack:  # closes the manager however this ends: no save cut off at exit
        mngr = checkpoints.manager(workdir, cfg.checkpoint)
        stack.callback(mngr.close)
        if resume:
            restored = checkpoints.restore(mngr, step, model=checkpoints.abstract(state_lib.model_item(state)),
                                           train=checkpoints.abstract(state_lib.train_item(state)))
            state = state_lib.state_from_items(restored["model"], restored["train"])
            logging.info("resumed from step %d", step)
            if is_main:  # the checks have passed: the resumable fields (e.g. train.epochs) may have changed
                runs.save_config(cfg, workdir)
                print(f"resuming from checkpoint step {step}", flush=True)
        if is_main:  # what a killed attempt logged past the checkpoint (or before the first one) is redone
            runs.keep_metrics_until(workdir, step)
        writer = metrics_lib.MetricWriter(workdir, enabled=is_main, wandb_project=cfg.train.wandb_project,
                                          config=cfg.to_dict(), first_step=step + 1)
        stack.callback(writer.close)
        writer.hparams(cfg.to_dict(), ["val/accuracy", "val/macro_f1", "test/accuracy", "test/macro_f1"])
        if not int(state.step):
            writer.write(0, counts, kind="params")
        train_loop(cfg, state, setup, mngr, writer, train_batches, encoded, dataset, meta, refit)
        mngr.wait_until_finished()

        # Report on test with the best checkpoint (a refit's last), exactly as an eval-only run would.
        result = evaluate(workdir, split="test", which="latest" if refit else "best", mesh_config=cfg.mesh,
                          dataset=dataset)
        result["wall_seconds"] = time.time() - t_start
        result.update(counts)
        writer.write(total_steps, {"test/accuracy": result["accuracy"], "test/macro_f1": result["macro_f1"]},
                     kind="test")
        writer.confusion(total_steps, "test", result)
    if is_main:
        runs.write_report(workdir, runs.RESULT_FILE, result)
    return result


class TrainingDiverged(ValueError):
    """The loss or the parameters became NaN or infinite."""


def check_finite(host_sums: dict, mngr) -> None:
    """Passes if no step since the epoch began had a non-finite loss or state, as the sums fetched for logging
    or saving tell (the train step records the first such step in them: no extra fetch); else waits for the
    saves in flight, all of finite states since every save follows this check, and stops the run."""
    first = int(host_sums["first_nonfinite"])
    if not first:
        return
    mngr.wait_until_finished()
    raise TrainingDiverged(
        f"training diverged: the loss or parameters became NaN/inf at step {first}; the checkpoints keep the last "
        f"finite state (latest step {mngr.latest_step()}); fix the config (e.g. a lower "
        "--config.train.learning_rate) and rerun with the same --workdir to resume from it")


def train_loop(cfg, state, setup, mngr, writer, train_batches, encoded, dataset, meta, refit) -> state_lib.TrainState:
    """Epochs from the state's step to cfg.train.epochs: train, validate, checkpoint; returns the final state."""
    mesh, is_main = setup.mesh, jax.process_index() == 0
    steps_per_epoch = len(train_batches)
    decay = cfg.train.ema_decay
    schedule = optimizer.learning_rate(cfg, steps_per_epoch * cfg.train.epochs)
    train_step = steps.make_train_step(setup, cfg.train.confidence_penalty,
                                       losses.class_weights(cfg, encoded["train"].labels, dataset.num_classes), decay)
    predict_step = steps.make_predict_step(setup.graphdef, mesh, cfg.mesh, setup.state_sharding.params,
                                           setup.state_sharding.rest, setup.batch_sharding)
    schedule = optimizer.learning_rate(cfg, len(train_batches) * cfg.train.epochs)
    step = int(state.step)

    def checkpoint(step, epoch, index, host_sums, seconds, val=None):
        checkpoints.save(mngr, step, state_lib.model_item(state), state_lib.train_item(state),
                         {"epoch": epoch, "batch_index": index, "epoch_seconds": seconds,
                          **checkpoints.data_position(cfg.train.batch_size),
                          "epoch_sums": {k: float(v) for k, v in host_sums.items()}},
                         metrics=val)

    first_epoch, first_index = divmod(step, steps_per_epoch)
    for epoch in range(first_epoch, cfg.train.epochs):
        start = first_index if epoch == first_epoch else 0
        sums = steps.zero_metrics(mesh)
        prior_seconds = 0.0
        if start:  # resumed mid-epoch: continue the epoch's running sums and clock
            sums = {k: jax.device_put(jnp.float32(meta["epoch_sums"].get(k, 0.0)), sharding.replicated(mesh))
                    for k in steps.METRIC_KEYS}
            prior_seconds = meta["epoch_seconds"]
        t0 = time.time()
        seen, t_log, logged = 0, time.time(), jax.device_get(sums)
        with tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                  disable=not is_main, mininterval=1, dynamic_ncols=True) as bar:  # closed on errors too
            for index, batch in train_batches.epoch(epoch, start):
                state, sums = train_step(state, sharding.put_batch(batch, setup.batch_sharding), sums)
                step += 1
                seen += len(batch["label"]) * jax.process_count()
                bar.update(1)
                at_epoch_end = index + 1 == steps_per_epoch
                save = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and not at_epoch_end
                if step % cfg.train.log_every == 0 or save:  # the only fetches of the sums mid-epoch
                    host = jax.device_get(sums)
                    check_finite(host, mngr)
                if step % cfg.train.log_every == 0:
                    rate = seen / (time.time() - t_log)
                    step_loss = (host["loss_sum"] - logged["loss_sum"]) / max(host["count"] - logged["count"], 1)
                    seen, t_log, logged = 0, time.time(), host
                    bar.set_postfix(loss=f"{host['loss_sum'] / host['count']:.4f}",
                                    acc=f"{host['correct'] / host['count']:.4f}", ex_s=f"{rate:.0f}")
                    writer.write(step, {"train/running_loss": host["loss_sum"] / host["count"],
                                        "train/step_loss": step_loss, "train/examples_per_s": rate,
                                        "train/learning_rate": schedule(step - 1) if callable(schedule) else schedule})
                if save:
                    checkpoint(step, epoch, index + 1, host, prior_seconds + time.time() - t0)
        host = jax.device_get(sums)
        check_finite(host, mngr)
        seconds = prior_seconds + time.time() - t0
        scalars = {"train/loss": host["loss_sum"] / host["count"], "train/accuracy": host["correct"] / host["count"]}
        val = None  # what the checkpoint is ranked by; a refit trained on validation, so it has none
        if not refit:
            weights = state_lib.model_item(state)  # the average when on: it picks the best checkpoint
            report, _ = evaluate_split(cfg, predict_step, weights["params"], weights["rest"], encoded["validation"],
                                       dataset.label_names, setup.batch_sharding, desc="validation")
            writer.confusion(step, "val", report)
            val = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}
            scalars.update({"val/loss": report["loss"], **{f"val/{k}": v for k, v in val.items()}})
        scalars.update({"epoch_seconds": seconds, "train/examples_per_s": host["count"] / seconds})
        writer.write(step, scalars, kind="epoch", epoch=epoch + 1)
        if is_main:
            print(f"epoch {epoch + 1}: " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()), flush=True)
        checkpoint(step, epoch + 1, 0, dict.fromkeys(steps.METRIC_KEYS, 0.0), 0.0, val=val)
    return state


def evaluate(workdir: str | pathlib.Path, *, split: str = "test", which: str | int = "best", mesh_config=None,
             dataset: data_lib.Dataset | None = None, calibrate: bool | None = None) -> dict:
    """Eval-only: one checkpoint of the run (`runs.load`, on the current devices or `mesh_config`'s mesh)
    reports a split of its own data, and the report is written to eval_<split>_<which>.json.
    `calibrate` (default: the run's eval.calibrate) adds temperature scaling fitted on validation."""
    workdir = pathlib.Path(workdir)
    run = runs.load(workdir, which, mesh_config=mesh_config)
    if calibrate is not None:
        run.cfg = run.cfg.copy_and_resolve_references()
        run.cfg.eval.calibrate = calibrate
    config_base.check_config(run.cfg)  # a refit run (trained on validation) refuses calibrate
    dataset = dataset or data_lib.load_dataset(run.cfg.data)
    if split not in dataset.splits:
        raise ValueError(f"unknown split '{split}'; choose one of {sorted(dataset.splits)}")
    encoded = encode_splits(run.cfg, dataset, run.encoder, workdir)
    report, probs = evaluate_split(run.cfg, run.predict_step, run.params, run.rest, encoded[split], run.label_names,
                                   run.batch_sharding, desc=f"eval {split}")
    report.update({"split": split, "checkpoint_step": run.step, "checkpoint": str(which),
                   "texts_sha256": metrics_lib.texts_digest(dataset.splits[split].texts)})
    validation = None
    if run.cfg.eval.calibrate:  # a temperature fitted on validation, reported on `split`
        _, val_probs = evaluate_split(run.cfg, run.predict_step, run.params, run.rest, encoded["validation"],
                                      run.label_names, run.batch_sharding)
        validation = (val_probs, encoded["validation"].labels)
    if jax.process_index() == 0:
        report.update(metrics_lib.test_time_additions(probs, encoded[split].labels, run.label_names, workdir,
                                                      f"{split}_{which}", validation))
        runs.write_report(workdir, runs.eval_report_name(split, which), report)
        print(metrics_lib.format_report(report, run.label_names), flush=True)
    return report
