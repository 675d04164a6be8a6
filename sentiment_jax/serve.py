"""HTTP API over trained runs or exports: `python -m sentiment_jax.serve --model=NAME=WORKDIR [--model=...]`.

  POST /v1/predict  {"texts": [...], "model": "NAME"}  -> labels and class probabilities
  GET  /v1/models   the loaded runs with their test metrics (result.json)
  GET  /healthz     liveness, no key needed;  GET /docs, /openapi.json  the schema

Requests to /v1 need a key in the X-API-Key header, one of those in --api_keys_file (one
per line) or $SENTIMENT_JAX_API_KEYS (comma-separated). Every model is compiled for its
fixed buckets before the port opens, and concurrent requests to one model are batched.
A request is admitted before its body is read (key, then rate limit), its body must arrive
within --body_timeout, and each model's queue is bounded; SIGTERM drains, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import math
import os
import pathlib
import sys
import time
from typing import Annotated, Any

import numpy as np

from sentiment_jax._extras import MissingExtra, require

for _module in ("fastapi", "pydantic", "uvicorn"):
    require(_module, "serve", program=__name__ == "__main__")
from fastapi import Depends, FastAPI, HTTPException, Request, Security  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from fastapi.security import APIKeyHeader  # noqa: E402
from pydantic import AfterValidator, BaseModel, ConfigDict, Field  # noqa: E402
import h11  # noqa: E402
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

KEYS_ENV = "SENTIMENT_JAX_API_KEYS"
KEY_HEADER = "X-API-Key"
ERRORS = {400: "Malformed JSON", 401: "Missing or invalid API key", 404: "Unknown model",
          408: "The body did not arrive within --body_timeout",
          413: "Too many texts, a text too long, or a body too large", 415: "Body not sent as JSON",
          429: "Over this key's rate limit (see Retry-After)", 500: "A bug: the request could not be answered",
          503: "This model's queue is full (see Retry-After)"}
MAX_HEAD_BYTES = 8 * 1024  # request line and headers; more: uvicorn answers 400 and closes
KEEP_ALIVE_S = 5  # a connection with no request head this long after opening or answering is closed
DRAIN_S = 30  # on SIGTERM, the most time the accepted requests get to be answered


# ---------------------------------------------------------------------------------------
# Request and response bodies (these are also the OpenAPI schema).

def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("empty text")
    return text


Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Text] = Field(min_length=1, description="Texts to classify.")
    model: str | None = Field(None, description="A name from /v1/models; default: the first one served.")


class Error(BaseModel):
    detail: str | list[dict] = Field(description="What was wrong (a list of field errors for 422)")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    name: str
    type: str = Field(description="config.model.name of the run")
    labels: list[str]
    checkpoint_step: int
    metrics: dict[str, Any] | None = Field(description="The run's test report (result.json), if any")


class ModelList(BaseModel):
    models: list[ModelInfo]


# ---------------------------------------------------------------------------------------
# Batching and limits.


class Batcher:
    """Runs one model's predictions off the event loop, merging requests that arrive meanwhile.

    No timer: an idle model answers at once, and a busy one takes everything queued while
    it worked (up to `max_rows` texts) as its next batch. At most `max_waiting` requests
    wait; one more raises asyncio.QueueFull rather than growing memory.
    """

    def __init__(self, predict, max_rows: int, max_waiting: int = 0):
        self.predict, self.max_rows = predict, max_rows
        self.queue: asyncio.Queue = asyncio.Queue(max_waiting)

    async def __call__(self, texts: list[str]) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((texts, future))
        return await future

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            rows = len(jobs[0][0])
            while rows < self.max_rows and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                rows += len(jobs[-1][0])
            try:
                probs = await asyncio.to_thread(self.predict, [t for texts, _ in jobs for t in texts])
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for texts, future in jobs:
                if not future.done():  # the client may have gone
                    future.set_result(probs[start:start + len(texts)])
                start += len(texts)


class RateLimit:
    """A token bucket per API key: `rate` requests per second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.buckets = rate, burst, {}

    def wait(self, key: bytes) -> float:
        """0 if a request with this key may go now (and counts it), else seconds until one may."""
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate


class Admission:
    """ASGI middleware that turns a request away before the app parses anything.

    In order: on /v1 a valid key (401) within its rate limit (429), decided on the headers
    alone; then the whole body within `max_bytes` (413, from Content-Length before any of it is
    read) and `body_timeout` seconds (408). Only /v1 takes a body: elsewhere (/healthz, the
    docs) any body is a 413, so nobody without a key gets bytes buffered. Refusals close the
    connection, so a body nobody will read is not received.
    """

    def __init__(self, app, keys: list[bytes], rate_limit: RateLimit | None, max_bytes: int, body_timeout: float):
        self.app, self.keys, self.rate_limit = app, keys, rate_limit
        self.max_bytes, self.body_timeout = max_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            keyed = scope["path"].startswith("/v1/")
            if keyed:
                self.check_key(scope)
            limit = self.max_bytes if keyed else 0
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                raise HTTPException(413, self.too_large(limit))
            try:
                async with asyncio.timeout(self.body_timeout):
                    body = await self.read_body(receive, limit)
            except TimeoutError:
                raise HTTPException(408, f"the body did not arrive within {self.body_timeout:g} s") from None
        except HTTPException as e:
            response = JSONResponse({"detail": e.detail}, e.status_code, headers={**(e.headers or {}),
                                                                                 "Connection": "close"})
            return await response(scope, receive, send)
        if body is None:  # the client went away
            return

        async def replay():
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)

    def check_key(self, scope) -> None:
        given = dict(scope["headers"]).get(KEY_HEADER.lower().encode(), b"")
        # Compare with every key (no early exit), each in constant time.
        if not sum(hmac.compare_digest(given, k) for k in self.keys):
            raise HTTPException(401, f"missing or invalid API key in the {KEY_HEADER} header")
        wait = self.rate_limit.wait(given) if self.rate_limit else 0
        if wait:
            raise HTTPException(429, "over this key's rate limit; retry later",
                                headers={"Retry-After": str(math.ceil(wait))})

    @staticmethod
    def too_large(limit: int) -> str:
        return f"request body over {limit} bytes" if limit else "this path takes no request body"

    async def read_body(self, receive, limit: int) -> bytes | None:
        """The whole body, or None if the client disconnected first."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                raise HTTPException(413, self.too_large(limit))
        return b"".join(chunks)


class BoundedH11(H11Protocol):
    """uvicorn's h11 protocol with the bounds it lacks, its refusals in JSON like the app's:

    - a connection that sends no whole request head within KEEP_ALIVE_S of opening or of its
      last answer is closed (uvicorn alone waits forever for a head that trickles in, or for a
      first byte);
    - bytes that are not HTTP, or a head over MAX_HEAD_BYTES, get a JSON 400 (uvicorn's is text);
    - past `max_connections` open connections or requests in flight, a request gets a JSON 503
      with Retry-After (uvicorn's `limit_concurrency` answers in text, without Retry-After).
    """

    def __init__(self, *args, max_connections: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        app = self.app

        async def bounded(scope, receive, send):  # this connection and request count themselves
            if len(self.connections) > max_connections or len(self.tasks) > max_connections:
                response = JSONResponse({"detail": f"over {max_connections} open connections; retry later"}, 503,
                                        headers={"Retry-After": "1", "Connection": "close"})
                return await response(scope, receive, send)
            return await app(scope, receive, send)

        self.app = bounded

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.close_unless_a_request_follows()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()
        self.close_unless_a_request_follows(answered)

    def close_unless_a_request_follows(self, answered=None) -> None:
        def check():
            if self.cycle is answered and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(KEEP_ALIVE_S, check)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"detail": msg}).encode()
        for event in (h11.Response(status_code=400, reason=b"Bad Request",
                                   headers=[(b"content-type", b"application/json"), (b"connection", b"close")]),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


# ---------------------------------------------------------------------------------------
# The app.


def read_keys(file: str | None) -> list[str]:
    """API keys from a file (one per line) or $SENTIMENT_JAX_API_KEYS (comma-separated)."""
    if file:
        lines = pathlib.Path(file).read_text().splitlines()
    else:
        lines = os.environ.get(KEYS_ENV, "").split(",")
    keys = [k.strip() for k in lines if k.strip()]
    if not keys:
        raise ValueError(f"no API keys: pass --api_keys_file=FILE or set ${KEYS_ENV}")
    return keys


def scalar_metrics(report: dict | None) -> dict | None:
    """The scalar entries of a test report (accuracy, macro-F1, ...)."""
    return None if report is None else {k: v for k, v in report.items() if isinstance(v, (int, float, str))}


def create_app(predictors: dict, api_keys: list[str], *, max_texts: int = 64, max_chars: int = 10_000,
               queue_size: int = 64, rate_limit: float = 0, rate_burst: int = 20,
               body_timeout: float = 10) -> FastAPI:
    """The API over already loaded (and warmed-up) predictors of runs or exports, the first one the default.

    queue_size: requests that may wait per model (more: 503); rate_limit: requests per second
    per key (0: none), with bursts of rate_burst (more: 429); body_timeout: seconds a body
    may take to arrive (more: 408).
    """
    batchers = {name: Batcher(p.predict, max_rows=max(p.batch_sizes[-1], max_texts), max_waiting=queue_size)
                for name, p in predictors.items()}
    models = ModelList(models=[
        ModelInfo(name=name, type=p.kind, labels=list(p.label_names), checkpoint_step=p.checkpoint_step,
                  metrics=scalar_metrics(p.metrics))
        for name, p in predictors.items()])
    default = next(iter(predictors))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        tasks = [asyncio.create_task(b.run()) for b in batchers.values()]
        yield
        for task in tasks:
            task.cancel()

    app = FastAPI(title="sentiment_jax", version="1", lifespan=lifespan,
                  description=f"Text sentiment classification. Send an API key in the {KEY_HEADER} header.")
    # Room for any request within the limits, even with every character JSON-escaped (up to 12 bytes).
    app.add_middleware(Admission, keys=[k.encode() for k in api_keys],
                       rate_limit=RateLimit(rate_limit, rate_burst) if rate_limit else None,
                       max_bytes=max_texts * (12 * max_chars + 16) + 1024, body_timeout=body_timeout)
    # Admission checks the key, before the body is read; this declares it in the schema.
    authorized = Security(APIKeyHeader(name=KEY_HEADER, auto_error=False))

    async def json_body(request: Request) -> None:
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind != "application/json":
            raise HTTPException(415, "send the body as JSON with Content-Type: application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON body"}, 400)
        return JSONResponse({"detail": jsonable(errors)}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return JSONResponse({"detail": "internal server error; the server log has the cause"}, 500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "models": len(predictors)}

    @app.get("/v1/models", dependencies=[authorized], responses={401: {"model": Error}})
    async def list_models() -> ModelList:
        return models

    @app.post("/v1/predict", dependencies=[authorized, Depends(json_body)],
              responses={code: {"description": text, "model": Error} for code, text in ERRORS.items()})
    async def predict(body: PredictRequest) -> PredictResponse:
        name = body.model or default
        if name not in predictors:
            raise HTTPException(404, f"unknown model '{name}'; loaded: {sorted(predictors)}")
        if len(body.texts) > max_texts:
            raise HTTPException(413, f"{len(body.texts)} texts; at most {max_texts} per request")
        longest = max(range(len(body.texts)), key=lambda i: len(body.texts[i]))
        if len(body.texts[longest]) > max_chars:
            raise HTTPException(413, f"texts[{longest}] has {len(body.texts[longest])} characters; "
                                     f"at most {max_chars}")
        try:
            probs = await batchers[name](body.texts)
        except asyncio.QueueFull:
            raise HTTPException(503, f"model '{name}' has {queue_size} requests waiting; retry later",
                                headers={"Retry-After": "1"}) from None
        return PredictResponse(model=name, predictions=predictors[name].records(probs))

    return app


def jsonable(errors: list[dict]) -> list[dict]:
    """Pydantic errors without the offending input echoed back (it may be large)."""
    return [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]


def fail(message) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_models(specs: list[str], checkpoint: str, batch_sizes: list[str] | None) -> dict:
    """--model=NAME=WORKDIR specs (runs or export folders) -> name: warmed-up predictor (exits on bad input)."""
    from sentiment_jax import exported

    errors = (MissingExtra, FileNotFoundError, ValueError, KeyError)
    if not all(exported.is_export(spec.partition("=")[2]) for spec in specs):
        from sentiment_jax import checkpoints  # only runs need the training code

        errors += (checkpoints.CheckpointError,)
    predictors = {}
    for spec in specs:
        name, sep, workdir = spec.partition("=")
        if not sep or not name or not workdir or name in predictors:
            fail(f"--model={spec}: expected NAME=WORKDIR with a name not used before")
        try:
            sizes = [int(b) for b in batch_sizes] if batch_sizes else None
            predictors[name] = exported.load_predictor(workdir, name=name, checkpoint=checkpoint, batch_sizes=sizes)
        except errors as e:
            fail(f"--model={spec}: {e}")
        predictors[name].warmup()
        print(f"loaded {name}: {workdir} step {predictors[name].checkpoint_step}", flush=True)
    return predictors


def main(argv) -> None:
    del argv
    from absl import flags, logging

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        keys = read_keys(FLAGS.api_keys_file)  # before importing JAX, to fail fast
    except (OSError, ValueError) as e:
        fail(e)
    predictors = load_models(FLAGS.model, FLAGS.checkpoint, FLAGS.batch_sizes)
    import uvicorn

    app = create_app(predictors, keys, max_texts=FLAGS.max_texts, max_chars=FLAGS.max_chars,
                     queue_size=FLAGS.queue_size, rate_limit=FLAGS.rate_limit, rate_burst=FLAGS.rate_burst,
                     body_timeout=FLAGS.body_timeout)
    # The protocol bounds what reaches the app: h11 refuses a request head over MAX_HEAD_BYTES and
    # bytes that are not HTTP (400, then closes); over --max_connections it answers 503.
    uvicorn.run(app, host=FLAGS.host, port=FLAGS.port,
                http=functools.partial(BoundedH11, max_connections=FLAGS.max_connections),
                h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_keep_alive=KEEP_ALIVE_S,
                timeout_graceful_shutdown=DRAIN_S, access_log=False, log_level="info")


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_multi_string("model", None, "NAME=WORKDIR of a trained run or an export folder; repeat to "
                              "serve several (the first is the default).", required=True)
    flags.DEFINE_string("checkpoint", "best", "best, latest or a step number, for every run (an export holds one).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("api_keys_file", None, f"File with one API key per line (default: ${KEYS_ENV}).")
    flags.DEFINE_integer("max_texts", 64, "Most texts in one request (more: 413).")
    flags.DEFINE_integer("max_chars", 10_000, "Most characters in one text (more: 413).")
    flags.DEFINE_list("batch_sizes", None, "Compiled batch buckets (default buckets.BATCH_SIZES).")
    flags.DEFINE_integer("queue_size", 64, "Requests that may wait for each model (more: 503 with Retry-After).",
                         lower_bound=1)
    flags.DEFINE_float("rate_limit", 0, "Requests per second allowed per API key (more: 429); 0: no limit.",
                       lower_bound=0)
    flags.DEFINE_integer("rate_burst", 20, "Requests one key may send at once within --rate_limit.", lower_bound=1)
    flags.DEFINE_float("body_timeout", 10, "Seconds a request body may take to arrive (more: 408).", lower_bound=0.1)
    flags.DEFINE_integer("max_connections", 256, "Open connections or requests in flight at most (more: a JSON "
                         "503).", lower_bound=1)


if __name__ == "__main__":
    from absl import app as absl_app

    define_flags()
    absl_app.run(main)
