"""The HTTP API of a run folder's model (FastAPI), and `serve`, which runs it under uvicorn.

    POST /v1/classify   an image (multipart field `file`, PNG or JPEG) or JSON {"pixels": [[...], ...]}
                        -> {"classes": [{"index", "name", "probability"}, ...] (top_k of them),
                        "conversion": [steps from the image to the model input, in words]}, and with
                        ?saliency=true the map |d logit_c / d x| of the top class c (rows, or a PNG).
                        The conversion is `nnlab predict`'s (nnlab.predict.image_to_input); ?invert=
                        true|false forces the inversion it otherwise decides from the background
    POST /v1/generate   JSON {prompt, max_new_tokens, temperature, top_k, seed, stream} -> {"text", ...};
                        stream=true: server-sent events, one `data: {"text": ...}` per token, then
                        `event: done`
    POST /v1/attention  JSON {text} -> how the last token of `text` attends over its context (the
                        last block_size tokens), per layer and head (ServedModel.last_token_attention)
    GET  /v1/model      the model card;  GET /healthz;  GET /openapi.json and /docs (FastAPI's)

Every error is JSON {"detail": "..."} with a 4xx status naming what is wrong. CPU work (decoding,
forward passes, decoding steps) runs in a thread pool or the batcher's thread, never on the event
loop, so one slow request does not stall the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from nnlab.errors import NnlabError
from nnlab.serve.batching import Batcher, QueueFull
from nnlab.serve.guards import BodyLimit, TokenAuth
from nnlab.serve.model import GENERATE_DEFAULTS, BadRequest, ServedModel, png_base64, rank

TOKEN_ENV = "NNLAB_SERVE_TOKEN"
STATIC_DIR = Path(__file__).parent / "static"
# JSON pixel arrays of at most this many values convert on the event loop (a 28x28 array in tens of
# microseconds); larger ones, and uploads, go to the thread pool.
INLINE_PIXELS = 4096


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the text to continue; every character must be in the model's vocabulary")
    max_new_tokens: int | None = Field(None, description="tokens to add (default: nnlab generate's, "
                                       "at most the server's cap; see GET /v1/model)")
    temperature: float = Field(GENERATE_DEFAULTS["temperature"], ge=0, allow_inf_nan=False, description="0 = greedy")
    top_k: int | None = Field(GENERATE_DEFAULTS["top_k"], ge=1, description="sample among the k likeliest tokens")
    seed: int = Field(GENERATE_DEFAULTS["seed"], ge=0, lt=2**63, description="the same seed gives the same text")
    stream: bool = Field(False, description="server-sent events, one per token")
    context_shift: int = Field(0, ge=0, description="0: every token sees the full context (nanoGPT's sample.py); "
                               "S: once the context fills, keep its newest block_size - S tokens and decode from "
                               "the cache (faster, shorter contexts; torch backend)")


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="the context, e.g. a prompt and its completion; its last block_size tokens "
                                  "are used, and every character must be in the model's vocabulary")


CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": {"type": "object", "required": ["pixels"], "properties": {
        "pixels": {"type": "array", "description": "rows of grey values 0-255",
                   "items": {"type": "array", "items": {"type": "number"}}}}}}}}}


def create_app(run_dir: str | Path, token: str | None = None, max_new_tokens_cap: int = 1000,
               max_body_bytes: int = 8 * 2**20, max_batch: int = 32, batch_wait_ms: float = 0.0,
               backend: str = "torch") -> FastAPI:
    """The API for the model in `run_dir`. With a token, every request but /healthz must send
    `Authorization: Bearer TOKEN`. max_batch > 1 batches concurrent classify requests (up to
    max_batch images: those already waiting, plus any that arrive within batch_wait_ms; see
    batching.py); 1 runs each request on its own. backend "onnxruntime" runs RUN_DIR/model.onnx
    (`nnlab export`): no saliency, and generation without a KV cache (see model.py)."""
    if max_new_tokens_cap < 0 or max_body_bytes < 1 or max_batch < 1 or batch_wait_ms < 0:
        raise NnlabError("serve: max_new_tokens_cap >= 0, max_body_bytes >= 1, max_batch >= 1, batch_wait_ms >= 0")
    served = ServedModel(run_dir, backend)
    # The batcher's thread also ranks the classes, which leaves the event loop only the HTTP work.
    batcher = (Batcher(served.ranked, max_batch, batch_wait_ms)
               if served.is_classifier and max_batch > 1 else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if batcher is not None:
            batcher.close()

    app = FastAPI(title="nnlab serve", version="1", lifespan=lifespan,
                  description=f"The model of run folder {served.run_dir.name}: {served.kind}.")
    app.state.model = served
    app.state.streams_open = 0  # server-sent event streams in progress (changed on the event loop only)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if token:
        app.add_middleware(TokenAuth, token=token)  # added last: runs first
    _error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict:
        batches = {"batches": batcher.batches, "batched_items": batcher.items} if batcher else {}
        return {"status": "ok", "streams_open": app.state.streams_open, **batches}

    @app.get("/v1/model")
    def model_card() -> dict:
        limits = {"max_new_tokens_cap": max_new_tokens_cap, "max_body_bytes": max_body_bytes, "max_batch": max_batch}
        return {**served.card(), "server_limits": limits}

    @app.post("/v1/classify", openapi_extra=CLASSIFY_BODY)
    async def classify(request: Request, top_k: int = Query(5, ge=1, description="how many classes to return"),
                       invert: bool | None = Query(None, description="invert the image's brightness (default: "
                                                   "only an image on a light background; the model expects light "
                                                   "on dark), as `nnlab predict --invert/--no-invert`"),
                       saliency: bool = Query(False, description="add |d logit / d input| of the top class "
                                              "(the torch backend only)"),
                       saliency_format: Literal["rows", "png"] = Query("rows", description="a list of rows, "
                                                                        "or a base64 PNG scaled to its maximum")):
        if not served.is_classifier:
            raise BadRequest(f"this server holds a {served.kind} model; /v1/classify needs an image classifier")
        fields = await _image_fields(request)
        if _small_pixels(fields):
            image = served.image(**fields, invert=invert)  # cheaper here than a hand-off to a thread
        else:  # decoding an upload, or a large array, would hold up every other request
            image = await run_in_threadpool(served.image, **fields, invert=invert)
        answer = {"conversion": image.conversion}
        if saliency:
            probs, saliency_map = await run_in_threadpool(served.saliency, image.x)
            ranking = rank(probs[None])[0]
            answer["saliency"] = (png_base64(saliency_map) if saliency_format == "png"
                                  else [[round(float(v), 6) for v in row] for row in saliency_map])
        elif batcher is not None:
            try:
                ranking = await asyncio.wrap_future(batcher.submit(image.x[0]))
            except QueueFull:
                raise HTTPException(503, "too many classify requests waiting; try again shortly") from None
        else:
            ranking = (await run_in_threadpool(served.ranked, image.x))[0]
        # A JSONResponse of plain values: FastAPI's encoder would walk every value again.
        return JSONResponse({"classes": served.top_classes(ranking, top_k), **answer})

    @app.post("/v1/generate", dependencies=[Depends(_json_body)])
    def generate(req: GenerateRequest):
        n = req.max_new_tokens if req.max_new_tokens is not None else min(GENERATE_DEFAULTS["max_new_tokens"],
                                                                           max_new_tokens_cap)
        if not 0 <= n <= max_new_tokens_cap:
            raise BadRequest(f"max_new_tokens: {n} is outside 0..{max_new_tokens_cap} (this server's cap)")
        pieces = served.token_stream(req.prompt, n, req.temperature, req.top_k, req.seed, req.context_shift)
        if not req.stream:
            completion = "".join(pieces)
            return {"prompt": req.prompt, "completion": completion, "text": req.prompt + completion}
        return StreamingResponse(_events(app, req.prompt, pieces), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @app.post("/v1/attention", dependencies=[Depends(_json_body)])
    def attention(req: AttentionRequest) -> dict:
        return served.last_token_attention(req.text)

    if STATIC_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="page")
    return app


def _json_body(request: Request) -> None:
    """415 for a body that is not JSON (checked before FastAPI reports the body as invalid)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(415, f"content type {content_type or 'none'!r}: send application/json")


def _small_pixels(fields: dict) -> bool:
    rows = fields.get("pixels")
    return (isinstance(rows, list) and len(rows) <= INLINE_PIXELS
            and sum(len(r) if isinstance(r, list) else 1 for r in rows) <= INLINE_PIXELS)


async def _image_fields(request: Request) -> dict:
    """The image of a classify request: {"data": bytes} from a multipart upload, or {"pixels": rows}."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequest("file: missing; send the image as the multipart field 'file'")
        return {"data": await upload.read()}
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"body: not valid JSON ({e})") from None
        if not isinstance(body, dict) or "pixels" not in body:
            raise BadRequest('body: expected a JSON object {"pixels": [[...], ...]}')
        return {"pixels": body["pixels"]}
    raise HTTPException(415, f"content type {content_type or 'none'!r}: send multipart/form-data with "
                             "a 'file' field, or application/json with 'pixels'")


async def _events(app: FastAPI, prompt: str, pieces):
    """Server-sent events for a generation. Each step runs in the thread pool; when the client goes
    away the response task is cancelled here, and `finally` stops the generation and frees its cache."""
    app.state.streams_open += 1
    text = prompt
    try:
        while (piece := await run_in_threadpool(next, pieces, None)) is not None:
            text += piece
            yield f"data: {json.dumps({'text': piece})}\n\n"
        yield f"event: done\ndata: {json.dumps({'text': text})}\n\n"
    finally:
        pieces.close()
        app.state.streams_open -= 1


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "body: not valid JSON"}, status_code=400)
        where = lambda e: ".".join(str(p) for p in e.get("loc", ()))  # noqa: E731
        return JSONResponse({"detail": "; ".join(f"{where(e)}: {e.get('msg')}" for e in errors)}, status_code=422)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: a free one), for uvicorn's `sockets=`.

    Made with proto IPPROTO_TCP, which its connections inherit: asyncio turns Nagle's algorithm off
    (TCP_NODELAY) only on a connection whose socket says it is TCP, and socket.create_server's says 0.
    With Nagle on, a response's body (uvicorn writes it after the headers) waits for the client's
    delayed ACK, about 40 ms on Linux, on every request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name == "posix":  # as socket.create_server: a restarted server can bind at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          **app_options) -> None:
    """Serve the model of `run_dir` over HTTP until interrupted. Binding anything but a loopback
    address needs an API token: `token`, or else the environment variable NNLAB_SERVE_TOKEN."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise NnlabError(f"--host {host}: serving beyond this machine needs an API token "
                         f"(--token or ${TOKEN_ENV}); every request but /healthz must then send it")
    if not 0 <= port <= 65535:
        raise NnlabError(f"--port: {port} is not a TCP port (0-65535)")
    # Bound here rather than by uvicorn, so that a busy port is a one-line error like any other.
    try:
        sock = listening_socket(host, port)
    except OSError as e:
        raise NnlabError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    with sock:
        app = create_app(run_dir, token=token, **app_options)
        print(f"nnlab serve: {Path(run_dir)} on http://{host}:{sock.getsockname()[1]}/ (API docs at /docs)", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
