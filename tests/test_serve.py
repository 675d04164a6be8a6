"""The HTTP API, started for real in a subprocess on 127.0.0.1 and used over HTTP."""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from fastapi.testclient import TestClient
from hypothesis import strategies as st

from sentiment_jax import serve

from conftest import REPO, TINY_RUNS, child_env

KEYS = ("key-one", "key-two")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log, env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in child_env().items() if k != serve.KEYS_ENV}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "sentiment_jax.serve", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def serving(tmp, models: list[str], *flags: str) -> tuple[subprocess.Popen, str, object]:
    """A server on a free port once it answers /healthz: (process, base URL, log file)."""
    (tmp / "keys.txt").write_text("\n".join(KEYS) + "\n")
    port, log_file = free_port(), tmp / "server.log"
    with open(log_file, "w") as log:
        proc = start_server([*models, f"--port={port}", f"--api_keys_file={tmp / 'keys.txt'}", *flags], log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return proc, url, log_file
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"server did not start:\n{log_file.read_text()[-3000:]}")


BODY_TIMEOUT = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, trained_runs):
    """Serves every tiny run (the first is the default); yields (base URL, log file)."""
    models = [f"--model={name}={workdir}" for name, workdir in trained_runs.items()]
    proc, url, log_file = serving(tmp_path_factory.mktemp("serve"), models, "--max_texts=8", "--max_chars=200",
                                  "--batch_sizes=1,8", f"--body_timeout={BODY_TIMEOUT}")
    yield url, log_file
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], headers={serve.KEY_HEADER: KEYS[1]}, timeout=30) as c:
        yield c


def test_healthz_needs_no_key(server):
    assert httpx.get(f"{server[0]}/healthz").json() == {"status": "ok", "models": len(TINY_RUNS)}


def test_models_lists_runs_with_their_metrics(client, trained_runs):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == list(TINY_RUNS)
    for m in models:
        result = json.loads((trained_runs[m["name"]] / "result.json").read_text())
        assert m["type"] == TINY_RUNS[m["name"]]["type"]
        assert m["labels"] == TINY_RUNS[m["name"]]["labels"]
        assert m["metrics"]["accuracy"] == result["accuracy"]
        assert m["checkpoint_step"] == result["checkpoint_step"]


@pytest.mark.parametrize("name", TINY_RUNS)
def test_predict_each_model(client, predictors, name):
    texts = ["great good film", "awful, boring plot", "it was fine"]
    response = client.post("/v1/predict", json={"texts": texts, "model": name})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == name
    labels = TINY_RUNS[name]["labels"]
    probs = [[p["probabilities"][label] for label in labels] for p in body["predictions"]]
    np.testing.assert_allclose(probs, predictors[name].predict(texts), atol=1e-5)
    assert [p["label"] for p in body["predictions"]] == [labels[i] for i in np.argmax(probs, 1)]


def test_the_first_model_is_the_default(client):
    assert client.post("/v1/predict", json={"texts": ["good"]}).json()["model"] == next(iter(TINY_RUNS))


@pytest.mark.parametrize("body, status", [
    ('{"texts": ["good"', 400),  # malformed JSON
    ("\xff", 400),
    ('{"texts": ["good"], "model": "nope"}', 404),  # unknown model
    (json.dumps({"texts": ["good"] * 9}), 413),  # --max_texts=8
    (json.dumps({"texts": ["good", "x" * 201]}), 413),  # --max_chars=200
    ("[" + " " * 30_000 + "]", 413),  # body larger than any valid request
    ('{"texts": []}', 422),  # empty
    ('{"texts": [""]}', 422),
    ('{"texts": ["  \\n"]}', 422),
    ('{"texts": "good"}', 422),  # wrong types
    ('{"texts": [1]}', 422),
    ('{"texts": ["good"], "model": 1}', 422),
    ('{"text": ["good"]}', 422),  # unknown field
    ("[]", 422),
    ("", 422),
])
def test_bad_requests_get_clear_json_errors(client, body, status):
    response = client.post("/v1/predict", content=body.encode("latin-1") if body == "\xff" else body,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_a_body_not_sent_as_json_is_refused(client):
    response = client.post("/v1/predict", content='{"texts": ["good"]}', headers={"Content-Type": "text/plain"})
    assert response.status_code == 415


@pytest.mark.parametrize("headers", [{}, {serve.KEY_HEADER: "wrong"}, {serve.KEY_HEADER: KEYS[0] + "x"},
                                     {serve.KEY_HEADER: "kéy".encode()},
                                     {"Authorization": f"Bearer {KEYS[0]}"}])
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/predict")])
def test_requests_without_a_valid_key_get_401(server, headers, method, path):
    response = httpx.request(method, server[0] + path, headers=headers, json={"texts": ["good"]})
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_works(server, key):
    assert httpx.get(f"{server[0]}/v1/models", headers={serve.KEY_HEADER: key}).status_code == 200


def test_openapi_schema_is_served(server):
    schema = httpx.get(f"{server[0]}/openapi.json").json()
    assert {"/v1/predict", "/v1/models", "/healthz"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == serve.KEY_HEADER
    assert {"400", "401", "404", "413", "422"} <= set(schema["paths"]["/v1/predict"]["post"]["responses"])


def test_concurrent_requests_all_succeed_with_the_sequential_answers(client, server):
    texts = [[f"good film {i}", "bad " * (i % 20 + 1)] for i in range(24)]
    sequential = [client.post("/v1/predict", json={"texts": t, "model": "gru"}).json() for t in texts]

    def ask(t):
        with httpx.Client(base_url=server[0], headers={serve.KEY_HEADER: KEYS[0]}, timeout=30) as c:
            return c.post("/v1/predict", json={"texts": t, "model": "gru"})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(ask, texts))
    assert [r.status_code for r in responses] == [200] * len(texts)
    for got, want in zip(responses, sequential):
        for g, w in zip(got.json()["predictions"], want["predictions"]):
            assert g["label"] == w["label"]
            np.testing.assert_allclose(list(g["probabilities"].values()), list(w["probabilities"].values()),
                                       atol=1e-5)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
BODIES = (JSON | st.fixed_dictionaries({"texts": JSON}, optional={"model": JSON})
          | st.fixed_dictionaries({"texts": st.lists(st.text(max_size=300), max_size=10)},
                                  optional={"model": st.sampled_from([*TINY_RUNS, "", "nope"])}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES | st.binary(max_size=64))
def test_fuzzed_bodies_never_get_a_5xx(client, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/predict", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400, 404, 413, 422), response.text
    assert response.json()


# ---------------------------------------------------------------------------------------
# Hostile clients, at the socket level, beside well-behaved ones.


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def request_head(key: str = KEYS[0], length: int = 0, extra: str = "", path: str = "/v1/predict") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"{serve.KEY_HEADER}: {key}\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_wrong_key_gets_401_before_the_body_is_sent(server):
    with connect(server[0]) as sock:
        sock.sendall(request_head(key="wrong", length=10_000_000))  # announces 10 MB, sends none of it
        t0 = time.perf_counter()
        status, body = status_and_json(read_until_closed(sock))
    assert status == 401 and "API key" in body["detail"]
    assert time.perf_counter() - t0 < BODY_TIMEOUT  # not a body timeout: it never waited for the body


@pytest.mark.parametrize("path, length, detail", [
    ("/healthz", 10_000_000, "takes no request body"),  # no key needed there, so no body either
    ("/no/such/path", 10_000_000, "takes no request body"),
    ("/v1/predict", 10**12, "request body over"),  # a valid key, but a body far over the limit
])
def test_a_body_that_will_not_be_read_is_refused_before_it_is_sent(server, path, length, detail):
    with connect(server[0]) as sock:
        sock.sendall(request_head(length=length, path=path))  # announces the body, sends none of it
        t0 = time.perf_counter()
        status, body = status_and_json(read_until_closed(sock))
    assert status == 413 and detail in body["detail"]
    assert time.perf_counter() - t0 < BODY_TIMEOUT


def test_a_trickling_body_gets_408_while_others_are_answered(server, client):
    sock, stop = connect(server[0]), threading.Event()
    sock.sendall(request_head(length=100))

    def trickle():  # a byte every 0.2 s: 20 s for the whole body
        with contextlib.suppress(OSError):
            while not stop.wait(0.2):
                sock.sendall(b" ")

    t0 = time.perf_counter()
    threading.Thread(target=trickle, daemon=True).start()
    try:
        answered = client.post("/v1/predict", json={"texts": ["good"]})
        assert answered.status_code == 200 and time.perf_counter() - t0 < BODY_TIMEOUT
        status, body = status_and_json(read_until_closed(sock))
    finally:
        stop.set()
        sock.close()
    assert status == 408 and "did not arrive" in body["detail"]
    assert BODY_TIMEOUT <= time.perf_counter() - t0 < BODY_TIMEOUT + 5


def test_clients_that_disconnect_mid_request_leave_the_server_answering(server, client):
    whole = json.dumps({"texts": ["good film"] * 8}).encode()
    for cut in (0, 1, len(whole) // 2, len(whole)):  # within the head's end, the body, or before the answer
        for _ in range(5):
            with connect(server[0]) as sock:
                sock.sendall(request_head(length=len(whole)) + whole[:cut])
    assert client.post("/v1/predict", json={"texts": ["good"]}).status_code == 200


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
    b"\x00\xff\xfe garbage \r\n\r\n",
    b"POST /v1/predict HTTP/1.1\r\nno colon in this header\r\n\r\n",
    b"POST /v1/predict HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n",
])
def test_garbage_gets_400_and_a_closed_connection(server, client, garbage):
    with connect(server[0]) as sock:
        sock.sendall(garbage)
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in response.lower()
    assert status_and_json(response)[1]["detail"]
    assert client.post("/v1/predict", json={"texts": ["good"]}).status_code == 200


def test_an_oversized_head_gets_400_without_waiting_for_its_end(server, client):
    with connect(server[0]) as sock:
        sock.sendall(request_head(extra=f"X-Filler: {'a' * 20_000}\r\n")[:-4])  # 20 kB, never ends
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    body = json.dumps({"texts": ["good"]}).encode()
    with connect(server[0]) as sock:  # a head within the limit is fine
        sock.sendall(request_head(length=len(body), extra=f"X-Filler: {'a' * 6_000}\r\nConnection: close\r\n")
                     + body)
        assert status_and_json(read_until_closed(sock))[0] == 200
    assert client.post("/v1/predict", json={"texts": ["good"]}).status_code == 200


def test_a_connection_that_never_finishes_its_head_is_closed(server):
    t0 = time.perf_counter()
    with connect(server[0]) as silent, connect(server[0]) as trickling:
        for part in (b"POST /v1/pre", b"dict HTTP/1.1\r\n", b"Host: a\r\n"):  # trickles, never ends
            trickling.sendall(part)
            time.sleep(1)
        assert read_until_closed(silent) == b"" and read_until_closed(trickling) == b""
    assert serve.KEEP_ALIVE_S - 0.5 <= time.perf_counter() - t0 < serve.KEEP_ALIVE_S + 5


def test_the_server_survived_everything(server):
    assert httpx.get(f"{server[0]}/healthz").status_code == 200
    assert "Traceback" not in server[1].read_text()


def test_read_keys_from_file_or_environment(tmp_path, monkeypatch):
    (tmp_path / "keys").write_text("a\n\n b \nabc,def\n")
    assert serve.read_keys(str(tmp_path / "keys")) == ["a", "b", "abc,def"]  # a file holds one key a line
    monkeypatch.setenv(serve.KEYS_ENV, "x, y,")
    assert serve.read_keys(None) == ["x", "y"]
    monkeypatch.setenv(serve.KEYS_ENV, " ")
    with pytest.raises(ValueError, match="no API keys"):
        serve.read_keys(None)


def test_the_server_refuses_to_start_without_keys(trained_runs, tmp_path):
    with open(tmp_path / "log", "w") as log:
        proc = start_server([f"--model=lstm={trained_runs['lstm']}"], log)
        assert proc.wait(timeout=120) == 2
    assert (tmp_path / "log").read_text().strip().splitlines()[-1].startswith("error: no API keys")


def test_batcher_merges_requests_that_wait_and_splits_the_answers():
    import asyncio
    import threading

    calls, release = [], threading.Event()

    def predict(texts):  # one row per text: its length, so answers are easy to check
        calls.append(list(texts))
        release.wait(5)
        return np.asarray([[len(t)] for t in texts])

    async def scenario():
        batcher = serve.Batcher(predict, max_rows=4)
        worker = asyncio.create_task(batcher.run())
        first = asyncio.create_task(batcher(["a"]))
        while not calls:  # the worker is busy with the first request...
            await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher([t * 2, t * 3])) for t in "bcd"]  # ...while these queue up
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(first, *rest)
        worker.cancel()
        return answers

    answers = asyncio.run(scenario())
    assert [a[:, 0].tolist() for a in answers] == [[1], [2, 3], [2, 3], [2, 3]]
    assert calls == [["a"], ["bb", "bbb", "cc", "ccc"], ["dd", "ddd"]]  # merged up to max_rows


def test_past_max_connections_a_request_gets_a_json_503_with_retry_after(trained_runs, tmp_path):
    proc, url, _ = serving(tmp_path, [f"--model=lstm={trained_runs['lstm']}"], "--batch_sizes=1",
                           "--max_connections=2")
    try:
        idle = [connect(url) for _ in range(2)]  # open, holding their slots (closed after KEEP_ALIVE_S)
        time.sleep(0.3)
        with httpx.Client(base_url=url, headers={serve.KEY_HEADER: KEYS[0]}) as c:
            refused = c.post("/v1/predict", json={"texts": ["good"]})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "over 2 open connections" in refused.json()["detail"]
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        with httpx.Client(base_url=url, headers={serve.KEY_HEADER: KEYS[0]}) as c:
            assert c.post("/v1/predict", json={"texts": ["good"]}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigterm_answers_every_accepted_request_then_exits(trained_runs, tmp_path):
    proc, url, log_file = serving(tmp_path, [f"--model=lstm={trained_runs['lstm']}"], "--batch_sizes=1,8")
    bodies = [json.dumps({"texts": [f"good film {i}", "awful"]}).encode() for i in range(4)]
    socks = [connect(url) for _ in bodies]
    for sock, body in zip(socks, bodies):  # accepted, but their bodies still on the way
        sock.sendall(request_head(length=len(body)) + body[:5])
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        connect(url)
    for sock, body in zip(socks, bodies):
        sock.sendall(body[5:])
    answers = [status_and_json(read_until_closed(sock)) for sock in socks]
    assert [status for status, _ in answers] == [200] * len(bodies)
    assert all(len(body["predictions"]) == 2 for _, body in answers)
    # uvicorn, once drained, ends by re-raising the signal it caught: killed by SIGTERM.
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert "Finished server process" in log_file.read_text() and "Traceback" not in log_file.read_text()


# ---------------------------------------------------------------------------------------
# Limits and failures, in process.


def broken(predictor, predict):
    """A copy of a loaded model that predicts with `predict`."""
    copy = dataclasses.replace(predictor)
    copy.predict = predict
    return copy


def test_an_unexpected_error_gets_a_json_500(predictors):
    def fails(texts):
        raise RuntimeError("a bug")

    app = serve.create_app({"lstm": broken(predictors["lstm"], fails)}, list(KEYS))
    with TestClient(app, raise_server_exceptions=False, headers={serve.KEY_HEADER: KEYS[0]}) as c:
        response = c.post("/v1/predict", json={"texts": ["good"]})
        assert response.status_code == 500 and "internal server error" in response.json()["detail"]
        assert c.post("/v1/predict", json={"texts": ["good"]}).status_code == 500  # still serving


def test_a_full_queue_gets_503_with_retry_after(predictors):
    lstm, started, release = predictors["lstm"], threading.Event(), threading.Event()

    def slow(texts):
        started.set()
        release.wait(20)
        return lstm.predict(texts)

    app = serve.create_app({"lstm": broken(lstm, slow)}, list(KEYS), queue_size=2)
    with TestClient(app, headers={serve.KEY_HEADER: KEYS[0]}) as c, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        ask = lambda: c.post("/v1/predict", json={"texts": ["good"]})  # noqa: E731
        working = pool.submit(ask)
        assert started.wait(20)  # the worker holds the first request...
        waiting = [pool.submit(ask) for _ in range(2)]  # ...and two wait: the queue is full
        time.sleep(0.5)
        refused = ask()
        release.set()
        assert [f.result().status_code for f in [working, *waiting]] == [200] * 3
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "requests waiting" in refused.json()["detail"]


def test_each_key_has_its_own_rate_limit(predictors):
    app = serve.create_app({"lstm": predictors["lstm"]}, list(KEYS), rate_limit=4, rate_burst=3)
    with TestClient(app) as c:
        one = [c.get("/v1/models", headers={serve.KEY_HEADER: KEYS[0]}) for _ in range(4)]
        assert [r.status_code for r in one] == [200, 200, 200, 429]  # a burst of 3, then over
        assert one[-1].headers["Retry-After"] == "1" and "rate limit" in one[-1].json()["detail"]
        assert c.get("/v1/models", headers={serve.KEY_HEADER: KEYS[1]}).status_code == 200
        time.sleep(0.3)  # 4 per second: one more request after 0.25 s
        assert c.get("/v1/models", headers={serve.KEY_HEADER: KEYS[0]}).status_code == 200
        assert c.get("/v1/models", headers={serve.KEY_HEADER: KEYS[0]}).status_code == 429
        assert c.get("/v1/models", headers={serve.KEY_HEADER: "wrong"}).status_code == 401
