"""The OpenAI-compatible HTTP server: FastAPI in front of the continuous-batching scheduler.

- The scheduler runs on its own thread; each request hands it a callback that forwards token deltas
  to the request's asyncio queue. Vision preprocessing and encoding run in the thread pool.
- `stream: true` answers with server-sent events (chat.completion.chunk), ending with a usage chunk
  and `[DONE]`; a client that goes away cancels its request, which frees its slot.
- Every error is {"error": {...}} with the right status: 400 bad request, 401 API key, 403 path
  outside the allowed folder, 404 unknown model, 429 queue full, 500 anything unexpected.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from nanovl.api import ImageEmbeds, VisionLanguageModel
from nanovl.engine.constrained import parse_response_format
from nanovl.engine.embed_store import EmbedStore
from nanovl.engine.scheduler import QueueFull, Scheduler
from nanovl.engine.scheduler import Request as EngineRequest
from nanovl.errors import NanovlError
from nanovl.media import is_video, load_document, load_video
from nanovl.serve.protocol import (
    APIError,
    ChatRequest,
    decode_embeds,
    parse_messages,
    resolve_source,
    sampling_fields,
)


class Metrics:
    def __init__(self):
        self.ttft_sum, self.ttft_count, self.errors = 0.0, 0, 0
        self.noted = weakref.WeakSet()  # requests whose time to first token is counted

    def render(self, sched: Scheduler, store: EmbedStore | None) -> str:
        s = sched.stats
        lines = [
            ("nanovl_requests_total", "counter", "chat requests admitted", s["requests"]),
            ("nanovl_prompt_tokens_total", "counter", "prompt tokens prefilled", s["prompt_tokens"]),
            ("nanovl_generated_tokens_total", "counter", "tokens generated", s["generated_tokens"]),
            ("nanovl_cancelled_total", "counter", "requests cancelled (client gone, timeout)", s["cancelled"]),
            ("nanovl_errors_total", "counter", "requests answered with an error", self.errors),
            ("nanovl_queue_depth", "gauge", "requests waiting for a slot", sched.queue_depth),
            ("nanovl_running", "gauge", "requests holding a slot", sched.running),
            ("nanovl_time_to_first_token_seconds_sum", "counter", "sum of times to first token", self.ttft_sum),
            ("nanovl_time_to_first_token_seconds_count", "counter", "requests with a first token", self.ttft_count),
            (
                "nanovl_embed_store_hits_total",
                "counter",
                "images served from the embedding store",
                store.hits if store else 0,
            ),
            (
                "nanovl_embed_store_misses_total",
                "counter",
                "images encoded by the vision encoder",
                store.misses if store else 0,
            ),
        ]
        out = []
        for name, kind, help_, value in lines:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"


def create_app(model, name: str, api_key: str | None = None, max_concurrency: int = 8, max_queue: int = 64,
               allowed_local_media_path: str | None = None, allow_remote_media: bool = False,
               request_timeout: float | None = None, max_len: int | None = None, embed_store: str | None = None,
               embed_store_bytes: int = 1 << 30, kv_cache_gb: float = 4.0) -> FastAPI:  # fmt: skip
    sched = Scheduler(model.model, model.tokenizer, max_slots=max_concurrency, max_len=max_len, max_queue=max_queue,
                      cache_bytes=int(kv_cache_gb * (1 << 30)))  # fmt: skip
    metrics = Metrics()
    allowed = Path(allowed_local_media_path) if allowed_local_media_path else None
    if isinstance(model, VisionLanguageModel):
        model.store = EmbedStore(embed_store_bytes, embed_store)

    @asynccontextmanager
    async def lifespan(app):
        sched.run()
        yield
        await run_in_threadpool(sched.close)  # graceful: what is running finishes

    app = FastAPI(title="nanovl", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = sched, metrics

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        metrics.errors += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                metrics.errors += 1
                err = APIError(401, "missing or wrong API key", type="authentication_error", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": sched.running, "queued": sched.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return metrics.render(sched, getattr(model, "store", None))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nanovl"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise APIError(400, f"{where}: {first['msg']}", param=where) from None
        if req.model != name:
            raise APIError(404, f"model {req.model!r} does not exist; this server has {name!r}", code="model_not_found")
        try:
            prompt_ids, embeds = await run_in_threadpool(build_prompt, req)
            fmt = parse_response_format(req.response_format)
            params = model.params(**sampling_fields(req), json_schema=(fmt["schema"] or True) if fmt else None)
        except NanovlError as e:
            raise APIError(400, str(e)) from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        reqs, queues = [], []
        loop = asyncio.get_running_loop()
        for i in range(req.n):
            q: asyncio.Queue = asyncio.Queue()
            seeded = (
                params
                if params.seed is None or i == 0
                else type(params)(**{**params.__dict__, "seed": params.seed + i})
            )
            er = EngineRequest(prompt_ids, seeded, lambda d, q=q: loop.call_soon_threadsafe(q.put_nowait, d),
                               embeds=embeds, top_logprobs=top, timeout=request_timeout)  # fmt: skip
            try:
                sched.submit(er)
            except QueueFull as e:
                for r in reqs:
                    sched.cancel(r)
                raise APIError(429, str(e), type="rate_limit_error") from None
            except NanovlError as e:
                raise APIError(400, str(e)) from None
            reqs.append(er)
            queues.append(q)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return EventSourceResponse(stream_events(req, reqs, queues, rid, created), ping=15)
        try:
            choices = await asyncio.gather(*(collect(r, q, i) for i, (r, q) in enumerate(zip(reqs, queues))))
        finally:
            for r in reqs:
                if r.finish_reason is None:
                    sched.cancel(r)
        completion = sum(len(r.output) for r in reqs)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                 "total_tokens": len(prompt_ids) + completion}  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
                "usage": usage}  # fmt: skip

    def build_prompt(req: ChatRequest):
        messages, refs = parse_messages(req.messages)
        if not refs:
            return model.tokenizer.encode_chat(messages), None
        if not isinstance(model, VisionLanguageModel):
            raise APIError(400, f"model {name!r} is text-only: it takes no images, documents or videos")
        media, counts = [], []
        for ref in refs:
            if ref.kind == "embeds":
                media.append(ImageEmbeds(decode_embeds(ref.data)))
                counts.append(1)
                continue
            src = resolve_source(ref.url, allowed, allow_remote_media)
            if ref.kind == "video" or (ref.kind == "image" and is_video(src)):
                media.append(load_video(src))
                counts.append(1)
            else:
                pages = load_document(src, ref.pages)
                media += pages
                counts.append(len(pages))
        it = iter(counts)
        for m in messages:  # a document part stands for one <image> per page
            parts = m["content"].split("<document>")
            m["content"] = parts[0] + "".join("<image>" * next(it) + rest for rest in parts[1:])
        params_reserve = req.max_completion_tokens or req.max_tokens or 1
        prompt = model.prepare_chat(messages, media, req.max_tiles, max(params_reserve, 1))
        return prompt.ids, prompt.embeds

    async def collect(er: EngineRequest, q: asyncio.Queue, index: int) -> dict:
        text, logprobs = [], []
        while True:
            d = await q.get()
            if not text:
                note_first_token(er)
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
                    note_first_token(reqs[i])
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

    def note_first_token(er: EngineRequest):
        """Count a request's time to first token once, when its first delta reaches us."""
        if er.first_token_at is not None and er not in metrics.noted:
            metrics.noted.add(er)
            metrics.ttft_sum += er.first_token_at - er.submitted
            metrics.ttft_count += 1

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


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None, **options):
    import uvicorn

    import nanovl

    model = nanovl.load(model_dir, dtype)
    name = Path(model_dir).resolve().name
    app = create_app(model, name, **options)
    sched = app.state.scheduler
    print(
        f"nanovl: serving {model_dir} as model {name!r}: {len(sched.free)} slots of {sched.max_len} tokens "
        f"({sched.cache.nbytes / 2**30:.2f} GiB of cache)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
