"""The HTTP API, started for real in a subprocess on 127.0.0.1 and used over HTTP."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentiment_jax import serve

from conftest import REPO, TINY_RUNS

KEYS = ("key-one", "key-two")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log, env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", serve.KEYS_ENV)}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "sentiment_jax.serve", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def server(tmp_path_factory, trained_runs):
    """Serves every tiny run (the first is the default); yields (base URL, log file)."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "keys.txt").write_text("\n".join(KEYS) + "\n")
    port, log_file = free_port(), tmp / "server.log"
    models = [f"--model={name}={workdir}" for name, workdir in trained_runs.items()]
    with open(log_file, "w") as log:
        proc = start_server([*models, f"--port={port}", f"--api_keys_file={tmp / 'keys.txt'}", "--max_texts=8",
                             "--max_chars=200", "--batch_sizes=1,8"], log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"server did not start:\n{log_file.read_text()[-3000:]}")
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


def test_the_server_survived_everything(server):
    assert httpx.get(f"{server[0]}/healthz").status_code == 200
    assert "Traceback" not in server[1].read_text()


def test_read_keys_from_file_or_environment(tmp_path, monkeypatch):
    (tmp_path / "keys").write_text("a\n\n b \n")
    assert serve.read_keys(str(tmp_path / "keys")) == ["a", "b"]
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
