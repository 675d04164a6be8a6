"""Times the CPU kernel's two custom calls alone: the LSTM forward steps and their gradient.

  python benchmarks/cpu_kernel_micro.py [--rows 32] [--hidden 128] [--steps 200] [--repeats 30]

One CPU device, its rows split over a thread per usable core as in training; inputs as wide as the
hidden state; float32 and bfloat16 (AMX tiles where the CPU has them); all rows real. Prints the median
milliseconds of each call; the forward includes the input projection.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from sentiment_jax import sharding  # noqa: E402

sharding.use_cpu_devices(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sentiment_jax import cpu_kernels  # noqa: E402


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t, b, h = args.steps, args.rows, args.hidden
    x = jnp.asarray(rng.normal(size=(t, b, h)), jnp.float32)
    w_x = jnp.asarray(rng.normal(size=(h, 4 * h)) * 0.1, jnp.float32)
    w_h = jnp.asarray(rng.normal(size=(h, 4 * h)) * 0.1, jnp.float32)
    bias, mask = jnp.zeros(4 * h), jnp.ones((t, b), bool)
    for dtype in (jnp.float32, jnp.bfloat16):
        x_in = x.astype(dtype)
        forward = jax.jit(lambda x, w: cpu_kernels.lstm_forward(x, w_x, bias, w, mask, False))
        outputs, final, _, cs, gates = forward(x_in, w_h)
        backward = jax.jit(lambda g, c, d, f, w: cpu_kernels.lstm_backward(g, c, d, f, mask, w, False, dtype))
        print(f"{jnp.dtype(dtype).name}: forward {median_ms(forward, x_in, w_h, repeats=args.repeats):.2f} ms, "
              f"gradient {median_ms(backward, gates, cs, outputs, final, w_h, repeats=args.repeats):.2f} ms "
              f"({b} rows, {h} units, {t} steps)", flush=True)


if __name__ == "__main__":
    main()
