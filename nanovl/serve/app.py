"""The OpenAI-compatible HTTP server: FastAPI in front of the continuous-batching scheduler.

- `create_app` builds the parts (the scheduler, the server's own Processor with the embedding store,
  the limits, the metrics) into one `Server` on `app.state.server`, and registers the middleware, the
  error handlers and the router (routes.py); the lifespan runs the scheduler's thread and a watchdog
  that restarts a dead engine loop.
- Every error is {"error": {...}} with the right status: 400 bad request, 401 API key, 403 path
  outside the allowed folder, 404 unknown model or route, 413 body too large, 429 queue full, 500
  anything unexpected (a request that fails in the engine: the others go on), 503 on /health when
  the engine is dead or stuck. Each is counted in nanovl_errors_total.
- One handler answers every validation failure (pydantic's, or FastAPI's for a declared parameter)
  with the same 400 (`protocol.invalid`).
- Admission (`Limits`): the body size, the number of images / pages / videos, the pixels of every
  image and page (from headers and page boxes) and the tile budget are checked, and the prompt's
  token count is known, before any page is rendered.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from nanovl.api import VisionLanguageModel
from nanovl.engine.embed_store import EmbedStore
from nanovl.engine.scheduler import Scheduler
from nanovl.errors import NanovlError
from nanovl.processor import Processor
from nanovl.serve.metrics import Metrics
from nanovl.serve.protocol import APIError, Limits, invalid, too_large
from nanovl.serve.routes import Server, router

log = logging.getLogger("nanovl.serve")


def create_app(model, name: str, api_key: str | None = None, max_concurrency: int = 8, max_queue: int = 64,
               allowed_local_media_path: str | None = None, allow_remote_media: bool = False,
               request_timeout: float | None = None, max_len: int | None = None, embed_store: str | None = None,
               embed_store_bytes: int = 1 << 30, kv_cache_gb: float = 4.0, limits: Limits | None = None,
               stall_timeout: float = 300.0) -> FastAPI:  # fmt: skip
    sched = Scheduler(model.model, model.tokenizer, max_slots=max_concurrency, max_len=max_len, max_queue=max_queue,
                      cache_bytes=int(kv_cache_gb * (1 << 30)))  # fmt: skip
    limits = limits or Limits()
    processor, store = None, None
    if isinstance(model, VisionLanguageModel):  # the server's own processor, with the embedding store
        store = EmbedStore(embed_store_bytes, embed_store)
        processor = Processor(model.vlm, model.tokenizer, model.path, store)
        processor.encoder = model.processor.encoder  # --vision-backend onnx
    server = Server(model, name, sched, processor, limits, Metrics(sched, store),
                    allowed=Path(allowed_local_media_path) if allowed_local_media_path else None,
                    allow_remote=allow_remote_media, request_timeout=request_timeout, stall_timeout=stall_timeout,
                    max_chars=sched.max_len * max(len(t) for t in model.tokenizer.tk.get_vocab()))  # fmt: skip
    app = FastAPI(title="nanovl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server, app.state.scheduler = server, sched
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body_bytes, on_error=server.metrics.count_error)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=WEB), name="web")
    app.add_api_route("/", web_page, methods=["GET"], include_in_schema=False)
    return app


WEB = Path(__file__).parent / "web"  # the page and its script: static files, no build step, no CDN
CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


async def web_page():
    return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": CSP})


@asynccontextmanager
async def lifespan(app: FastAPI):
    sched = app.state.server.scheduler
    sched.run()

    async def watchdog():
        while True:
            await asyncio.sleep(1.0)
            sched.revive()

    task = asyncio.create_task(watchdog())
    yield
    task.cancel()
    await run_in_threadpool(sched.close)  # graceful: what is running finishes


class Guard:
    """ASGI middleware: the API key on /v1/, and a body larger than `max_body` refused from its
    Content-Length before it is read (a body without one is counted as it is read, in `read_body`)."""

    def __init__(self, app, api_key: str | None, max_body: int, on_error):
        self.app, self.api_key, self.max_body, self.on_error = app, api_key, max_body, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            err = None
            if self.api_key and scope["path"].startswith("/v1/"):
                if headers.get(b"authorization", b"") != f"Bearer {self.api_key}".encode():
                    err = APIError(401, "missing or wrong API key", type="authentication_error", code="invalid_api_key")
            length = headers.get(b"content-length", b"0")
            if err is None and (not length.isdigit() or int(length) > self.max_body):
                err = too_large(self.max_body)
            if err is not None:
                self.on_error()
                return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        return await self.app(scope, receive, send)


def answer(request: Request, e: APIError) -> JSONResponse:
    request.app.state.server.metrics.count_error()
    return JSONResponse(e.body(), status_code=e.status)


async def api_error(request: Request, e: APIError):
    return answer(request, e)


async def validation_error(request: Request, e: ValidationError | RequestValidationError):
    errors = e.errors()
    if isinstance(e, RequestValidationError):  # FastAPI's locations start with where the value was: body, query
        errors = [{**x, "loc": tuple(x["loc"])[1:]} for x in errors]
    return answer(request, invalid(errors))


async def http_error(request: Request, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return answer(request, APIError(e.status_code, str(e.detail), type=kind))


async def unexpected(request: Request, e: Exception):
    log.error("nanovl: unexpected error", exc_info=e)
    message = f"internal error ({type(e).__name__}); the server goes on"
    return answer(request, APIError(500, message, type="server_error"))


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
          name: str | None = None, vision_backend: str = "torch", onnx: str | None = None, **options):  # fmt: skip
    import uvicorn

    import nanovl

    model = nanovl.load(model_dir, dtype)
    if vision_backend == "onnx":
        if not isinstance(model, VisionLanguageModel):
            raise NanovlError(f"{model_dir} is text-only: --vision-backend onnx needs a vision-language checkpoint")
        model.use_onnx_vision(onnx)
    name = name or Path(model_dir).resolve().name
    app = create_app(model, name, **options)
    sched = app.state.scheduler
    print(
        f"nanovl: serving {model_dir} as model {name!r}: {len(sched.free)} slots of {sched.max_len} tokens "
        f"({sched.cache.nbytes / 2**30:.2f} GiB of cache)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
