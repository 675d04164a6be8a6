"""HTTP API over trained runs or exports: `python -m sentiment_jax.serve --model=NAME=WORKDIR [--model=...]`.

  POST /v1/predict  {"texts": [...], "model": "NAME"}  -> labels and class probabilities
  GET  /v1/models   the loaded runs with their test metrics (result.json)
  GET  /healthz     liveness, no key needed;  GET /docs, /openapi.json  the schema

Requests to /v1 need a key in the X-API-Key header, one of those in --api_keys_file (one
per line) or $SENTIMENT_JAX_API_KEYS (comma-separated). Every model is compiled for its
fixed buckets before the port opens, and concurrent requests to one model are batched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import pathlib
import sys
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

KEYS_ENV = "SENTIMENT_JAX_API_KEYS"
KEY_HEADER = "X-API-Key"
ERRORS = {400: "Malformed JSON", 401: "Missing or invalid API key", 404: "Unknown model",
          413: "Too many texts, a text too long, or a body too large", 415: "Body not sent as JSON"}


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
    it worked (up to `max_rows` texts) as its next batch.
    """

    def __init__(self, predict, max_rows: int):
        self.predict, self.max_rows = predict, max_rows
        self.queue: asyncio.Queue = asyncio.Queue()

    async def __call__(self, texts: list[str]) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
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


class BodyLimit:
    """ASGI middleware: 413 as soon as a request body exceeds `max_bytes`, before it is parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client disconnected
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, 413)
                return await response(scope, receive, send)
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------
# The app.


def read_keys(file: str | None) -> list[str]:
    """API keys from a file (one per line) or $SENTIMENT_JAX_API_KEYS (comma-separated)."""
    text = pathlib.Path(file).read_text() if file else os.environ.get(KEYS_ENV, "")
    keys = [k.strip() for k in text.replace(",", "\n").splitlines() if k.strip()]
    if not keys:
        raise ValueError(f"no API keys: pass --api_keys_file=FILE or set ${KEYS_ENV}")
    return keys


def scalar_metrics(report: dict | None) -> dict | None:
    """The scalar entries of a test report (accuracy, macro-F1, ...)."""
    return None if report is None else {k: v for k, v in report.items() if isinstance(v, (int, float, str))}


def create_app(predictors: dict, api_keys: list[str], *, max_texts: int = 64, max_chars: int = 10_000) -> FastAPI:
    """The API over already loaded (and warmed-up) predictors of runs or exports, the first one the default."""
    keys = [k.encode() for k in api_keys]
    batchers = {name: Batcher(p.predict, max_rows=max(p.batch_sizes[-1], max_texts))
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
    app.add_middleware(BodyLimit, max_bytes=max_texts * (12 * max_chars + 16) + 1024)

    async def authorized(key: str | None = Security(APIKeyHeader(name=KEY_HEADER, auto_error=False))) -> None:
        given = (key or "").encode()
        # Compare with every key (no early exit), each in constant time.
        if not sum(hmac.compare_digest(given, k) for k in keys):
            raise HTTPException(401, f"missing or invalid API key in the {KEY_HEADER} header")

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

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "models": len(predictors)}

    @app.get("/v1/models", dependencies=[Depends(authorized)], responses={401: {"model": Error}})
    async def list_models() -> ModelList:
        return models

    @app.post("/v1/predict", dependencies=[Depends(authorized), Depends(json_body)],
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
        probs = await batchers[name](body.texts)
        return PredictResponse(model=name, predictions=predictors[name].records(probs))

    return app


def jsonable(errors: list[dict]) -> list[dict]:
    """Pydantic errors without the offending input echoed back (it may be large)."""
    return [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]


def fail(message) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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
    from sentiment_jax import exported

    errors = (MissingExtra, FileNotFoundError, ValueError, KeyError)
    if not all(exported.is_export(spec.partition("=")[2]) for spec in FLAGS.model):
        from sentiment_jax import checkpoints  # only runs need the training code

        errors += (checkpoints.CheckpointError,)
    predictors = {}
    for spec in FLAGS.model:
        name, sep, workdir = spec.partition("=")
        if not sep or not name or not workdir or name in predictors:
            fail(f"--model={spec}: expected NAME=WORKDIR with a name not used before")
        try:
            sizes = [int(b) for b in FLAGS.batch_sizes] if FLAGS.batch_sizes else None
            predictors[name] = exported.load_predictor(workdir, name=name, checkpoint=FLAGS.checkpoint,
                                                       batch_sizes=sizes)
        except errors as e:
            fail(f"--model={spec}: {e}")
        predictors[name].warmup()
        print(f"loaded {name}: {workdir} step {predictors[name].checkpoint_step}", flush=True)
    import uvicorn

    app = create_app(predictors, keys, max_texts=FLAGS.max_texts, max_chars=FLAGS.max_chars)
    uvicorn.run(app, host=FLAGS.host, port=FLAGS.port, access_log=False, log_level="info")


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


if __name__ == "__main__":
    from absl import app as absl_app

    define_flags()
    absl_app.run(main)
