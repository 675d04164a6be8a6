"""Train-step time, examples/s and per-device memory of one config on the current devices.

  python -m benchmarks.scale_out --cpu_devices=8 --config=configs/lstm.py:imdb,fsdp
  MODULE=benchmarks.scale_out launch/local.sh 2 --config=configs/lstm.py   # 2 processes

Synthetic batches of the config's global batch size and `--length` tokens, so only the
step is timed (no data loading). Memory is XLA's compile-time account of one device's
share of the step: arguments + outputs (less donated buffers) + temporaries.
"""

from __future__ import annotations

import json
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/lstm.py", "Config file[:variant].")
flags.DEFINE_integer("cpu_devices", None, "Simulate this many CPU devices.")
flags.DEFINE_integer("length", 200, "Tokens per example.")
flags.DEFINE_integer("vocab", 20000, "Vocabulary size (the word tokenizer's default).")
flags.DEFINE_integer("steps", 10, "Timed steps, after 2 warm-up steps.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import numpy as np

    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    from sentiment_jax import distributed, sharding, steps
    from sentiment_jax import state as state_lib

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cfg = FLAGS.config
    mesh = sharding.make_mesh(cfg.mesh)
    state, setup = state_lib.create_state(cfg, mesh, FLAGS.vocab, 2, total_steps=1000)
    step_fn = steps.make_train_step(setup)
    rows = cfg.train.batch_size // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    batch = sharding.put_batch({
        "ids": rng.integers(2, FLAGS.vocab, (rows, FLAGS.length)).astype(np.int32),
        "mask": np.ones((rows, FLAGS.length), bool), "label": rng.integers(0, 2, rows).astype(np.int32),
        "weight": np.ones(rows, np.float32)}, setup.batch_sharding)
    sums = steps.zero_metrics(mesh)
    memory = step_fn.lower(state, batch, sums).compile().memory_analysis()
    for _ in range(2):
        state, sums = step_fn(state, batch, sums)
    jax.block_until_ready(sums)
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, sums = step_fn(state, batch, sums)
    jax.block_until_ready(sums)
    seconds = (time.perf_counter() - t0) / FLAGS.steps
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    if jax.process_index() == 0:
        print(json.dumps({
            "processes": jax.process_count(), "devices": jax.device_count(), "mesh": dict(mesh.shape),
            "params": int(params), "global_batch": cfg.train.batch_size, "length": FLAGS.length,
            "step_ms": round(seconds * 1e3, 1), "examples_per_s": round(cfg.train.batch_size / seconds, 1),
            "device_memory_mib": round(peak / 2**20, 1),
            "device_arguments_mib": round(memory.argument_size_in_bytes / 2**20, 1)}))


if __name__ == "__main__":
    app.run(main)
