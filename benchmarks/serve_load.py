"""Load test of the HTTP API: N concurrent clients for S seconds on loopback.

  python benchmarks/serve_load.py --workdir=runs/lstm [--clients=8 --seconds=20 --texts_per_request=1]
  python benchmarks/serve_load.py --workdir=exports/lstm --texts_from=runs/lstm   # an export folder

Starts `python -m sentiment_jax.serve` on the run or export (or uses --url and --key of a running
one), sends test-split texts of the run's own dataset round-robin, each client one request
at a time over a kept-alive connection, and prints latency percentiles and throughput as
one JSON line. Every request must succeed.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

flags.DEFINE_string("workdir", None, "The trained run or export folder to serve.", required=True)
flags.DEFINE_string("texts_from", None, "The run whose test texts to send (default: --workdir).")
flags.DEFINE_integer("clients", 8, "Concurrent clients.")
flags.DEFINE_float("seconds", 20, "How long to send requests.")
flags.DEFINE_integer("texts_per_request", 1, "Texts in each request.")
flags.DEFINE_integer("num_texts", 1000, "How many test texts to cycle through.")
flags.DEFINE_string("url", None, "A running server to use instead of starting one.")
flags.DEFINE_string("key", None, "--url: its API key.")
FLAGS = flags.FLAGS


def test_texts(workdir: pathlib.Path, n: int) -> list[str]:
    from sentiment_jax import data, runs

    texts = data.load_dataset(runs.load_config(workdir).data).splits["test"].texts
    return [texts[i] for i in np.random.default_rng(0).permutation(len(texts))[:n]]


def start_server(workdir: pathlib.Path, keys: str, *serve_flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m sentiment_jax.serve` on a free port with `keys` (comma-separated), once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SENTIMENT_JAX_API_KEYS": keys}
    proc = subprocess.Popen([sys.executable, "-m", "sentiment_jax.serve", f"--model=bench={workdir}",
                             f"--port={port}", *serve_flags], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    while proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit(f"server exited with {proc.returncode}")


def client(url: str, key: str, texts: list[str], start: int, per_request: int, until: float,
           latencies: list, errors: list) -> None:
    i = start
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
        while time.perf_counter() < until:
            batch = [texts[(i + j) % len(texts)] for j in range(per_request)]
            i += per_request
            t0 = time.perf_counter()
            try:
                status = c.post("/v1/predict", json={"texts": batch}).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(status)


def run_clients(url: str, keys: list[str], texts: list[str], clients: int, per_request: int,
                seconds: float) -> tuple[list[float], list, float]:
    """`clients` threads (the k-th with keys[k % len(keys)]) for `seconds`: (latencies, errors, elapsed)."""
    latencies, errors = [], []
    until = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(url, keys[k % len(keys)], texts, k * 997, per_request,
                                                     until, latencies, errors))
               for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - t0


def main(argv) -> None:
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    workdir = pathlib.Path(FLAGS.workdir)
    texts = test_texts(pathlib.Path(FLAGS.texts_from or workdir), FLAGS.num_texts)
    key = FLAGS.key or secrets.token_hex(16)
    proc, url = (None, FLAGS.url) if FLAGS.url else start_server(workdir, key)
    try:
        load_before = os.getloadavg()[0]
        latencies, errors, elapsed = run_clients(url, [key], texts, FLAGS.clients, FLAGS.texts_per_request,
                                                 FLAGS.seconds)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    ms = np.asarray(latencies) * 1000
    print(json.dumps({
        "clients": FLAGS.clients, "seconds": round(elapsed, 1), "texts_per_request": FLAGS.texts_per_request,
        "requests": len(latencies), "errors": len(errors), "requests_per_s": round(len(latencies) / elapsed, 1),
        "texts_per_s": round(len(latencies) * FLAGS.texts_per_request / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "mean_text_chars": round(float(np.mean([len(t) for t in texts]))), "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # shared machine?
    }))
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, e.g. {errors[:5]}")


if __name__ == "__main__":
    app.run(main)
