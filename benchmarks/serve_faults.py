"""The HTTP API under hostile clients: serve_load.py's well-behaved clients, alone and then beside bad ones.

  python benchmarks/serve_faults.py --workdir=runs/nusax_en [--clients=8 --seconds=60 --bad_clients=2]

Starts `python -m sentiment_jax.serve` on 127.0.0.1 and runs the well-behaved clients twice for
--seconds: alone, then while another process runs --bad_clients threads of each kind: bodies that
trickle in, clients that disconnect mid-request, garbage bytes and oversized heads, heads that
never end, wrong keys in a loop, and one key over --rate_limit. Prints one JSON line: for each
phase the requests answered, the well-behaved clients' failures by status and their latency
percentiles; what the bad clients got back; the server's peak memory (VmHWM).
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import pathlib
import secrets
import select
import socket
import threading
import time

import httpx
import numpy as np
from absl import app, flags

import serve_load  # its flags (--workdir, --clients, --seconds, ...) are this script's too

flags.DEFINE_integer("bad_clients", 2, "Threads of each kind of bad client.")
flags.DEFINE_float("rate_limit", 100, "The server's --rate_limit (requests per second per key).")
flags.DEFINE_integer("rate_burst", 20, "The server's --rate_burst.")
FLAGS = flags.FLAGS


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def head(key: str, length: int, extra: str = "") -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"X-API-Key: {key}\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def answer(sock: socket.socket) -> str:
    """The status the server answered with before closing ('closed' if none)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        return "reset"
    first = b"".join(chunks).split(b" ", 2)
    return first[1].decode() if len(first) > 1 else "closed"


def trickle(url: str, key: str, until: float, counts: collections.Counter) -> None:
    """A body of 1000 bytes, one byte every 0.5 s, until the server gives up on it."""
    while time.monotonic() < until:
        with connect(url) as sock:
            sock.sendall(head(key, 1000))
            try:
                while not select.select([sock], [], [], 0.5)[0] and time.monotonic() < until:
                    sock.sendall(b" ")
                counts[f"trickle {answer(sock)}"] += 1
            except OSError:
                counts["trickle reset"] += 1


def disconnect(url: str, key: str, until: float, counts: collections.Counter) -> None:
    """Requests dropped within the head, within the body, or while the answer is computed."""
    body = json.dumps({"texts": ["a film I would watch again"] * 8}).encode()
    whole = head(key, len(body)) + body
    for i in range(10**9):
        if time.monotonic() > until:
            break
        with connect(url) as sock:
            sock.sendall(whole[:(len(whole) * (i % 4 + 1)) // 4])
        counts["disconnect"] += 1


def garbage(url: str, key: str, until: float, counts: collections.Counter) -> None:
    """Random bytes, and heads of 20 kB."""
    rng = np.random.default_rng(threading.get_ident() % 2**32)
    for i in range(10**9):
        if time.monotonic() > until:
            break
        with connect(url) as sock:
            if i % 2:
                sock.sendall(head(key, 0, f"X-Filler: {'a' * 20_000}\r\n")[:-4])
                counts[f"oversized head {answer(sock)}"] += 1
            else:
                sock.sendall(rng.integers(0, 256, 512, dtype=np.uint8).tobytes() + b"\r\n\r\n")
                counts[f"garbage {answer(sock)}"] += 1


def endless_head(url: str, key: str, until: float, counts: collections.Counter) -> None:
    """A request head sent a few bytes a second that never ends."""
    while time.monotonic() < until:
        with connect(url) as sock:
            try:
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\n")
                while not select.select([sock], [], [], 1)[0] and time.monotonic() < until:
                    sock.sendall(b"X-Slow: yes\r\n")
                counts[f"endless head {answer(sock)}"] += 1
            except OSError:
                counts["endless head reset"] += 1


def loop_requests(kind: str):
    def run(url: str, key: str, until: float, counts: collections.Counter) -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as c:
            while time.monotonic() < until:
                try:
                    counts[f"{kind} {c.post('/v1/predict', json={'texts': ['good']}).status_code}"] += 1
                except httpx.HTTPError as e:
                    counts[f"{kind} {type(e).__name__}"] += 1
    return run


BAD = {"trickle": trickle, "disconnect": disconnect, "garbage": garbage, "endless_head": endless_head,
       "wrong_key": loop_requests("wrong key"), "rate_limited": loop_requests("rate limited")}


def bad_clients(url: str, keys: dict, per_kind: int, seconds: float, results) -> None:
    """Every kind of bad client, `per_kind` threads each, in this (separate) process."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    until = time.monotonic() + seconds
    runs = [(BAD[kind], keys.get(kind, keys["good"]), collections.Counter()) for kind in BAD for _ in range(per_kind)]
    threads = [threading.Thread(target=run, args=(url, key, until, counts)) for run, key, counts in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(dict(sorted(sum((counts for _, _, counts in runs), collections.Counter()).items())))


def peak_rss_mb(pid: int) -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return round(int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) / 1024, 1)


def summary(latencies: list, errors: list, elapsed: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "failed_by_status": dict(collections.Counter(map(str, errors))),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main(argv) -> None:
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)
    workdir = pathlib.Path(FLAGS.workdir)
    texts = serve_load.test_texts(workdir, FLAGS.num_texts)
    good = [secrets.token_hex(16) for _ in range(FLAGS.clients)]  # one each: no well-behaved client is limited
    keys = {"good": good[0], "rate_limited": secrets.token_hex(16), "wrong_key": "not-a-key"}
    proc, url = serve_load.start_server(workdir, ",".join([*good, keys["rate_limited"]]),
                                        f"--rate_limit={FLAGS.rate_limit}", f"--rate_burst={FLAGS.rate_burst}")
    report = {"clients": FLAGS.clients, "seconds": FLAGS.seconds, "bad_clients_per_kind": FLAGS.bad_clients,
              "load_avg_1min_before": round(os.getloadavg()[0], 1)}
    try:
        report["alone"] = summary(*serve_load.run_clients(url, good, texts, FLAGS.clients, FLAGS.texts_per_request,
                                                          FLAGS.seconds))
        report["alone"]["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
        results = multiprocessing.get_context("spawn").Queue()
        bad = multiprocessing.get_context("spawn").Process(
            target=bad_clients, args=(url, keys, FLAGS.bad_clients, FLAGS.seconds, results))
        bad.start()
        report["beside_bad_clients"] = summary(*serve_load.run_clients(
            url, good, texts, FLAGS.clients, FLAGS.texts_per_request, FLAGS.seconds))
        report["bad_clients_got"] = results.get(timeout=120)
        bad.join()
        report["beside_bad_clients"]["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
        report["server_healthy_after"] = httpx.get(f"{url}/healthz").status_code == 200
    finally:
        proc.terminate()
        proc.wait()
    report["load_avg_1min_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
