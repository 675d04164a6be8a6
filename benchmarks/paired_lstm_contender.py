"""Paired-benchmark contender: training speed of the peers' `uni` and `bi2` LSTMs with this project's code.

Speaks the serve protocol of ../shared/bench/peers/README.md, so it joins their rotation:

  cd ../shared/bench/peers && python3 bench_paired.py --only 'torch uni' --contender \
      'jax uni=/path/to/python /path/to/repo/benchmarks/paired_lstm_contender.py --model uni'

Same arrays ($PEERS_HOME/imdb_10k_200.npz), shapes, batch 64 and Adam 1e-3 as the peers, built
with `state.create_state` / `steps.make_train_step`, and exact masking on: the mask is
`ids != 0`, so the front padding never reaches the LSTM state (the peers run it through).
`--bucket_width 0` (default) walks a seeded permutation with every batch 200 wide, as the
peers do; `--bucket_width 50` uses the training pipeline's length bucketing instead.
`--cpu_devices 2` shards each batch over one single-threaded CPU device per core (fastest for the scan);
`--backend cpu_kernel` runs fastest on JAX's one default device (`--cpu_devices 0`), whose custom calls
split the rows over the cores.
`--dtype bfloat16` runs the matmuls in bfloat16; the peers run float32, so pair it with
benchmarks/torch_autocast_peer.py, which gives PyTorch the same precision.
One difference remains in bi2: our head also applies dropout to the pooled features before its
first Dense layer, as `RecurrentClassifier` always does.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the bench starts us in its own folder
from sentiment_jax import config_base, input_pipeline, sharding, steps  # noqa: E402
from sentiment_jax import state as state_lib  # noqa: E402

VOCAB, BATCH = 10_000, 64


def peer_config(model: str, unroll: int, dtype: str = "float32"):
    """The peers' model and optimiser in our config: plain Adam, no clipping, no schedule."""
    c = config_base.base_config()
    c.model.embed_dim, c.model.unroll, c.model.dtype = 128, unroll, dtype
    if model == "uni":
        c.model.hidden_sizes, c.model.bidirectional, c.model.pooling = (128,), False, "last"
        c.train.loss = "sigmoid"
    else:
        c.model.hidden_sizes, c.model.bidirectional, c.model.pooling = (256, 256), True, "last"
        c.model.dropout, c.model.head_sizes = 0.3, (128,)
        c.train.loss = "softmax"
    c.train.batch_size, c.train.learning_rate, c.train.schedule = BATCH, 1e-3, "constant"
    c.train.grad_clip, c.train.weight_decay = 0.0, 0.0
    return c


def nominal_mflop(cfg, steps: int = 200) -> float:
    """Training MFLOP per example as the peers count it: 3 x 2*4*H*(E+H)*T per layer and direction."""
    total, width = 0, cfg.model.embed_dim
    for hidden in cfg.model.hidden_sizes:
        dirs = 2 if cfg.model.bidirectional else 1
        total += 3 * 2 * 4 * hidden * (width + hidden) * steps * dirs
        width = hidden * dirs
    return total / 1e6


def xla_gemm_gflops(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """n^3 matmul GFLOP/s of XLA itself in `dtype` (float32 accumulation), to set our figures against
    (median of reps)."""
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    mm(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return round(2 * n ** 3 / float(np.median(times)) / 1e9, 1)


def contender(model: str, ids: np.ndarray, labels: np.ndarray, *, batch: int = BATCH, dtype: str = "float32",
              backend: str = "scan", bucket_width: int = 0, unroll: int = 0, vocab: int = VOCAB,
              gemm_ceiling: bool = False):
    """Builds, compiles and warms up one model; returns (its ready line as a dict, timed), where
    timed(n) runs 1 untimed and n timed training steps and returns the serve protocol's reply."""
    cfg = peer_config(model, unroll or config_base.base_config().model.unroll, dtype)
    cfg.model.lstm_backend = backend
    split = input_pipeline.Encoded(ids, (ids != 0).sum(1).astype(np.int32), labels)
    batches = input_pipeline.Batches(split, batch, padding="pre", shuffle=True, seed=0, bucket_width=bucket_width)
    mesh = sharding.make_mesh(cfg.mesh)
    state, setup = state_lib.create_state(cfg, mesh, vocab, 2, total_steps=1)
    train_step = steps.make_train_step(setup)
    sums = steps.zero_metrics(mesh)

    def stream():
        epoch = 0
        while True:
            for _, b in batches.epoch(epoch):
                yield sharding.put_batch(b, setup.batch_sharding)
            epoch += 1

    data = stream()
    # Warm-up: compile every batch width the bucketing can produce, then 3 steps.
    length = ids.shape[1]
    for w in (range(bucket_width, length + 1, bucket_width) if bucket_width else [length]):
        b = {"ids": ids[:batch, -w:], "mask": ids[:batch, -w:] != 0, "label": labels[:batch],
             "weight": np.ones(batch, np.float32)}
        state, sums = train_step(state, sharding.put_batch(b, setup.batch_sharding), sums)
    for _ in range(3):
        state, sums = train_step(state, next(data), sums)
    jax.block_until_ready(state)
    mflop = nominal_mflop(cfg, length)

    def timed(n: int) -> dict:
        nonlocal state, sums
        state, sums = jax.block_until_ready(train_step(state, next(data), sums))  # untimed
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            state, sums = train_step(state, next(data), sums)
        jax.block_until_ready((state, sums))
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rate = n * batch / dt
        # cpu_s_per_step: CPU time of this process, a steadier yardstick than wall time on a busy machine.
        return {"steps": n, "seconds": round(dt, 4), "examples_per_s": round(rate, 2),
                "gflop_s": round(rate * mflop / 1e3, 1), "cpu_s_per_step": round(cpu / n, 4)}

    info = {"peer": f"jax {jax.__version__} / sentiment_jax", "model": model, "batch": batch, "mode": "serve",
            "unroll": cfg.model.unroll, "dtype": dtype, "backend": backend, "bucket_width": bucket_width,
            "mflop_per_example": round(mflop, 1), "params": state_lib.parameter_counts(state)["trainable_params"],
            "ready": True}
    if gemm_ceiling:
        info["xla_gemm_gflops"] = xla_gemm_gflops(dtype=dtype)
    return info, timed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("uni", "bi2"), default="uni")
    ap.add_argument("--data", default=os.path.join(os.environ.get("PEERS_HOME") or "/tmp/peers", "imdb_10k_200.npz"))
    ap.add_argument("--bucket_width", type=int, default=0)
    ap.add_argument("--unroll", type=int, default=0, help="scan unroll; 0 keeps the config default")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="matmul operand dtype (model.dtype); gates, cell state and gradients stay float32")
    ap.add_argument("--backend", choices=("scan", "cpu_kernel"), default="scan",
                    help="model.lstm_backend: the scan, or the recurrence as CPU custom calls")
    ap.add_argument("--cpu_devices", type=int, default=0, help=">0: shard each batch over this many single-threaded CPU devices")
    ap.add_argument("--steps", type=int, default=0, help=">0: time this many steps, print one line, exit")
    args = ap.parse_args(argv)
    if args.cpu_devices:
        sharding.use_cpu_devices(args.cpu_devices)
    with np.load(args.data) as f:
        ids, labels = f["x_train"].astype(np.int32), f["y_train"].astype(np.int32)
    info, timed = contender(args.model, ids, labels, dtype=args.dtype, backend=args.backend, bucket_width=args.bucket_width,
                            unroll=args.unroll, gemm_ceiling=True)
    if args.steps:
        print(json.dumps(dict(info, **timed(args.steps))), flush=True)
        return
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        print(json.dumps(timed(int(line))), flush=True)


if __name__ == "__main__":
    main()
