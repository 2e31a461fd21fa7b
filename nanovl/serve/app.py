"""The OpenAI-compatible HTTP server: FastAPI in front of the continuous-batching scheduler.

- The scheduler runs on its own thread; each request hands it a callback that forwards token deltas
  to the request's asyncio queue. Vision preprocessing and encoding run in the thread pool.
- `stream: true` answers with server-sent events (chat.completion.chunk), ending with a usage chunk
  and `[DONE]`; a client that goes away (streaming or not) cancels its request, which frees its slot.
- Every error is {"error": {...}} with the right status: 400 bad request, 401 API key, 403 path
  outside the allowed folder, 404 unknown model or route, 413 body too large, 429 queue full, 500
  anything unexpected (a request that fails in the engine: the others go on), 503 on /health when
  the engine is dead or stuck. A failure while streaming is an `{"error": ...}` event.
- Admission (`Limits`): the body size, the number of images / pages / videos, the pixels of every
  image and page (from headers and page boxes) and the tile budget are checked, and the prompt's
  token count is known, before any page is rendered; a watchdog restarts a dead engine loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from nanovl.api import VisionLanguageModel
from nanovl.engine.constrained import compile_constraint
from nanovl.engine.embed_store import EmbedStore
from nanovl.engine.sampling import SEED_RANGE
from nanovl.engine.scheduler import QueueFull, Scheduler
from nanovl.engine.scheduler import Request as EngineRequest
from nanovl.errors import NanovlError
from nanovl.media import DEFAULT_DPI, Page, Video, is_video
from nanovl.processor import ImageEmbeds, Processor, expand_documents, scan_source
from nanovl.serve.metrics import CONTENT_TYPE, Metrics
from nanovl.serve.protocol import (
    APIError,
    ChatRequest,
    Limits,
    decode_embeds,
    parse_body,
    parse_messages,
    parse_response_format,
    resolve_source,
    sampling_fields,
)

log = logging.getLogger("nanovl.serve")


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


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the limit of {limit} bytes", code="too_large")


async def read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def create_app(model, name: str, api_key: str | None = None, max_concurrency: int = 8, max_queue: int = 64,
               allowed_local_media_path: str | None = None, allow_remote_media: bool = False,
               request_timeout: float | None = None, max_len: int | None = None, embed_store: str | None = None,
               embed_store_bytes: int = 1 << 30, kv_cache_gb: float = 4.0, limits: Limits | None = None,
               stall_timeout: float = 300.0) -> FastAPI:  # fmt: skip
    sched = Scheduler(model.model, model.tokenizer, max_slots=max_concurrency, max_len=max_len, max_queue=max_queue,
                      cache_bytes=int(kv_cache_gb * (1 << 30)))  # fmt: skip
    limits = limits or Limits()
    allowed = Path(allowed_local_media_path) if allowed_local_media_path else None
    processor, store = None, None
    if isinstance(model, VisionLanguageModel):  # the server's own processor, with the embedding store
        store = EmbedStore(embed_store_bytes, embed_store)
        processor = Processor(model.vlm, model.tokenizer, model.path, store)
    metrics = Metrics(sched, store)
    # a prompt of more characters than this cannot fit one slot, whatever it tokenises to
    max_chars = sched.max_len * max(len(t) for t in model.tokenizer.tk.get_vocab())

    @asynccontextmanager
    async def lifespan(app):
        sched.run()

        async def watchdog():
            while True:
                await asyncio.sleep(1.0)
                sched.revive()

        task = asyncio.create_task(watchdog())
        yield
        task.cancel()
        await run_in_threadpool(sched.close)  # graceful: what is running finishes

    app = FastAPI(title="nanovl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = sched, metrics

    count_error = metrics.count_error
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body_bytes, on_error=count_error)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        count_error()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        count_error()
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):
        count_error()
        log.error("nanovl: unexpected error", exc_info=e)
        body = APIError(500, f"internal error ({type(e).__name__}); the server goes on", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        problem = sched.health(stall_timeout)
        body = {"status": "ok" if problem is None else "unhealthy", "model": name, "running": sched.running,
                "queued": sched.queue_depth, "restarts": sched.stats["restarts"]}  # fmt: skip
        if problem is not None:
            body["reason"] = problem
        return JSONResponse(body, status_code=200 if problem is None else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nanovl"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse_body(await read_body(request, limits.max_body_bytes))
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise APIError(400, f"{where + ': ' if where else ''}{first['msg']}", param=where or None) from None
        if req.model != name:
            raise APIError(404, f"model {req.model!r} does not exist; this server has {name!r}", code="model_not_found")
        if req.max_tiles is not None and not 1 <= req.max_tiles <= limits.max_tiles:
            raise APIError(400, f"max_tiles must be in [1, {limits.max_tiles}] on this server", param="max_tiles")
        try:
            fmt = parse_response_format(req.response_format)
            params = model.params(**sampling_fields(req), json_schema=(fmt["schema"] or True) if fmt else None)
            prompt_ids, embeds = await run_in_threadpool(build_prompt, req, params.max_new_tokens)
            constraint = None
            if fmt is not None:  # compiled (and probed) here: a schema the enforcer cannot take is a 400
                args = (model.tokenizer, model.model.config.vocab_size, fmt["schema"], prompt_ids)
                constraint = await run_in_threadpool(compile_constraint, *args)
        except NanovlError as e:
            raise APIError(400, str(e)) from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        reqs, queues = [], []
        loop = asyncio.get_running_loop()
        lo, span = SEED_RANGE[0], SEED_RANGE[1] - SEED_RANGE[0]
        for i in range(req.n):
            q: asyncio.Queue = asyncio.Queue()
            seeded = (
                params
                if params.seed is None or i == 0
                else type(params)(**{**params.__dict__, "seed": (params.seed + i - lo) % span + lo})
            )
            er = EngineRequest(prompt_ids, seeded, lambda d, q=q: loop.call_soon_threadsafe(q.put_nowait, d),
                               embeds=embeds, top_logprobs=top, timeout=request_timeout,
                               constraint=constraint)  # fmt: skip
            try:
                sched.submit(er)
            except QueueFull as e:
                for r in reqs:
                    sched.cancel(r)
                raise APIError(429, str(e), type="rate_limit_error") from None
            except NanovlError as e:
                for r in reqs:
                    sched.cancel(r)
                raise APIError(400, str(e)) from None
            reqs.append(er)
            queues.append(q)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return EventSourceResponse(stream_events(req, reqs, queues, rid, created), ping=15)
        gathered = asyncio.gather(*(collect(r, q, i) for i, (r, q) in enumerate(zip(reqs, queues))))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait([gathered, gone], return_when=asyncio.FIRST_COMPLETED)
            if not gathered.done():  # the client went away: its slots are freed below
                gathered.cancel()
                return JSONResponse(APIError(499, "client disconnected").body(), status_code=499)
            choices = gathered.result()
        finally:
            gone.cancel()
            for r in reqs:
                if r.finish_reason is None:
                    sched.cancel(r)
        failed = next((r for r in reqs if r.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", type="server_error")
        completion = sum(len(r.output) for r in reqs)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                 "total_tokens": len(prompt_ids) + completion}  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
                "usage": usage}  # fmt: skip

    async def disconnected(request: Request):
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    def build_prompt(req: ChatRequest, reserve: int):
        """Messages -> prompt ids (and merged embeddings). Media are sized from their headers and
        checked against `limits` before anything is decoded; the prompt's length is checked by
        prepare_chat before any page is rendered."""
        messages, refs = parse_messages(req.messages, model.tokenizer.escape)
        chars = sum(len(m["content"]) for m in messages)
        if chars > max_chars:
            raise APIError(400, f"the messages hold {chars} characters, more than a {sched.max_len}-token "
                                "context can take", code="context_length_exceeded")  # fmt: skip
        if not refs:
            return model.tokenizer.encode_chat(messages), None
        if processor is None:
            raise APIError(400, f"model {name!r} is text-only: it takes no images, documents or videos")
        media, counts = [], []
        for ref in refs:
            room = limits.max_media - len(media)
            if room <= 0:
                raise APIError(400, f"more than {limits.max_media} images, pages and videos in one request")
            if ref.kind == "embeds":
                media.append(ImageEmbeds(decode_embeds(ref.data)))
                counts.append(1)
                continue
            src = resolve_source(ref.url, allowed, allow_remote_media)
            if isinstance(src, Path) and src.stat().st_size > limits.max_body_bytes:
                raise APIError(400, f"{ref.url}: larger than the {limits.max_body_bytes} bytes a request may carry")
            video = ref.kind == "video" or (ref.kind == "image" and is_video(src))
            if video and sum(isinstance(m, Video) for m in media) >= limits.max_videos:
                raise APIError(400, f"more than {limits.max_videos} videos in one request")
            items = scan_source(src, ref.pages if not video else None, DEFAULT_DPI, limits.max_image_pixels,
                                max_pages=room, video=video)  # fmt: skip
            media += items
            counts.append(len(items))
            if len(media) > limits.max_media:
                raise APIError(400, f"more than {limits.max_media} images, pages and videos in one request")
        pixels = sum(p.size[0] * p.size[1] for p in media if isinstance(p, Page))
        pixels += sum(f.size[0] * f.size[1] for v in media if isinstance(v, Video) for f in v.frames)
        if pixels > limits.max_request_pixels:
            raise APIError(400, f"the images and pages of this request hold {pixels / 1e6:.0f} MP, over the "
                                f"limit of {limits.max_request_pixels / 1e6:.0f} MP")  # fmt: skip
        prompt = processor.prepare_chat(expand_documents(messages, counts), media, req.max_tiles, max(reserve, 1))
        return prompt.ids, prompt.embeds

    async def collect(er: EngineRequest, q: asyncio.Queue, index: int) -> dict:
        text, logprobs = [], []
        while True:
            d = await q.get()
            if not text:
                metrics.note_first_token(er)
            text.append(d.text)
            if d.logprobs is not None:
                logprobs.append(logprob_entry(d))
            if d.finish_reason is not None:
                break
        message = {"role": "assistant", "content": "".join(text)}
        from nanovl.engine.reasoning import split_reasoning

        reasoning, answer = split_reasoning(message["content"])
        if reasoning is not None:
            message = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
        choice = {"index": index, "message": message, "finish_reason": openai_reason(d.finish_reason)}
        choice["logprobs"] = {"content": logprobs} if er.top_logprobs is not None else None
        return choice

    async def stream_events(req, reqs, queues, rid, created):
        def chunk(choices, usage=None):
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": choices}  # fmt: skip
            if usage is not None:
                body["usage"] = usage
            return json.dumps(body)

        try:
            for i in range(len(reqs)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            pending = {i: asyncio.ensure_future(q.get()) for i, q in enumerate(queues)}
            while pending:
                done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
                for i, fut in list(pending.items()):
                    if fut not in done:
                        continue
                    d = fut.result()
                    if d.finish_reason == "error":  # the stream ends with the error, in OpenAI's shape
                        count_error()
                        yield json.dumps(APIError(500, f"generation failed: {d.error}", type="server_error").body())
                        return
                    metrics.note_first_token(reqs[i])
                    choice = {"index": i, "delta": {"content": d.text} if d.text else {}, "finish_reason": None}
                    if d.logprobs is not None:
                        choice["logprobs"] = {"content": [logprob_entry(d)]}
                    if d.finish_reason is not None:
                        choice["finish_reason"] = openai_reason(d.finish_reason)
                        del pending[i]
                    else:
                        pending[i] = asyncio.ensure_future(queues[i].get())
                    if d.text or d.finish_reason is not None or d.logprobs is not None:
                        yield chunk([choice])
            if req.stream_options is None or req.stream_options.include_usage:
                completion = sum(len(r.output) for r in reqs)
                prompt = len(reqs[0].prompt)
                usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
                yield chunk([], usage)
            yield "[DONE]"
        finally:  # the client went away (or we are done): free every slot still held
            for r in reqs:
                if r.finish_reason is None:
                    sched.cancel(r)

    def logprob_entry(d) -> dict:
        tk = model.tokenizer
        entry = {"token": tk.decode([d.logprobs["token"]]), "logprob": d.logprobs["logprob"], "bytes": None}
        entry["top_logprobs"] = [
            {"token": tk.decode([t]), "logprob": lp, "bytes": None} for t, lp in d.logprobs.get("top", [])
        ]
        return entry

    return app


def openai_reason(reason: str | None) -> str | None:
    return {"cancelled": "abort", "timeout": "length"}.get(reason, reason)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
          name: str | None = None, **options):  # fmt: skip
    import uvicorn

    import nanovl

    model = nanovl.load(model_dir, dtype)
    name = name or Path(model_dir).resolve().name
    app = create_app(model, name, **options)
    sched = app.state.scheduler
    print(
        f"nanovl: serving {model_dir} as model {name!r}: {len(sched.free)} slots of {sched.max_len} tokens "
        f"({sched.cache.nbytes / 2**30:.2f} GiB of cache)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
