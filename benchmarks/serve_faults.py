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
import random
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
flags.DEFINE_float("bad_interval", 0.02, "Each bad client thread (but the rate limit's abuser, who sends "
                   "as fast as it can) starts a new connection at most this often, in seconds.")
flags.DEFINE_float("rate_limit", 50, "The server's --rate_limit per key; keep it above what one well-behaved "
                   "client sends alone (see alone.requests_per_s / clients) and below what the abuser sends.")
flags.DEFINE_integer("rate_burst", 50, "The server's --rate_burst.")
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


def request(key: str) -> bytes:
    body = json.dumps({"texts": ["a film I would watch again"] * 8}).encode()
    return head(key, len(body)) + body


def trickle(sock: socket.socket, key: str, until: float) -> str:
    """A body of 1000 bytes, a byte every 0.5 s, until the server gives up on it."""
    sock.sendall(head(key, 1000))
    while not select.select([sock], [], [], 0.5)[0] and time.monotonic() < until:
        sock.sendall(b" ")
    return f"trickled body {answer(sock)}"


def endless_head(sock: socket.socket, key: str, until: float) -> str:
    """A request head that grows by a header a second and never ends."""
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\n")
    while not select.select([sock], [], [], 1)[0] and time.monotonic() < until:
        sock.sendall(b"X-Slow: yes\r\n")
    return f"endless head {answer(sock)}"


def disconnect(sock: socket.socket, key: str, until: float) -> str:
    """Gone within the head, within the body, or while the answer is computed."""
    whole = request(key)
    sock.sendall(whole[:len(whole) * random.randint(1, 4) // 4])
    return "disconnected"


def garbage(sock: socket.socket, key: str, until: float) -> str:
    sock.sendall(random.randbytes(512) + b"\r\n\r\n")
    return f"garbage {answer(sock)}"


def oversized_head(sock: socket.socket, key: str, until: float) -> str:
    sock.sendall(head(key, 0, f"X-Filler: {'a' * 20_000}\r\n")[:-4])
    return f"20 kB head {answer(sock)}"


def wrong_key(sock: socket.socket, key: str, until: float) -> str:
    sock.sendall(request("not-a-key"))
    return f"wrong key {answer(sock)}"


def over_rate_limit(sock: socket.socket, key: str, until: float) -> str:
    sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: bench\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n".encode())
    return f"over rate limit {answer(sock)}"


BAD = [trickle, endless_head, disconnect, garbage, oversized_head, wrong_key, over_rate_limit]


def keep_trying(attempt, url: str, key: str, until: float, interval: float, counts: collections.Counter) -> None:
    """`attempt` on a new connection every `interval` seconds (or as soon as the last one ends)."""
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            with connect(url) as sock:
                counts[attempt(sock, key, until)] += 1
        except OSError as e:
            counts[f"{attempt.__name__} {type(e).__name__}"] += 1
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))


def bad_clients(url: str, keys: dict, per_kind: int, interval: float, seconds: float, results) -> None:
    """Every kind of bad client, `per_kind` threads each, in this (separate) process."""
    until = time.monotonic() + seconds
    runs = [(attempt, keys["limited"] if attempt is over_rate_limit else keys["bad"], collections.Counter())
            for attempt in BAD for _ in range(per_kind)]
    threads = [threading.Thread(target=keep_trying, args=(attempt, url, key, until,
                                                          0 if attempt is over_rate_limit else interval, counts))
               for attempt, key, counts in runs]
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
    keys = {"bad": secrets.token_hex(16), "limited": secrets.token_hex(16)}
    proc, url = serve_load.start_server(workdir, ",".join([*good, *keys.values()]),
                                        f"--rate_limit={FLAGS.rate_limit}", f"--rate_burst={FLAGS.rate_burst}")
    report = {"clients": FLAGS.clients, "seconds": FLAGS.seconds, "bad_clients_per_kind": FLAGS.bad_clients,
              "load_avg_1min_before": round(os.getloadavg()[0], 1)}
    try:
        report["alone"] = summary(*serve_load.run_clients(url, good, texts, FLAGS.clients, FLAGS.texts_per_request,
                                                          FLAGS.seconds))
        report["alone"]["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
        results = multiprocessing.get_context("spawn").Queue()
        bad = multiprocessing.get_context("spawn").Process(
            target=bad_clients, args=(url, keys, FLAGS.bad_clients, FLAGS.bad_interval, FLAGS.seconds, results))
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
