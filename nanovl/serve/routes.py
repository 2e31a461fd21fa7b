"""The endpoints: /health, /metrics, /v1/models, /v1/chat/completions, and the document endpoints
/v1/extract, /v1/convert and /v1/pages (the web page's), as one APIRouter.

- Handlers read the server (`Server`: model, scheduler, processor, limits, metrics) from
  `request.app.state.server`; nothing is captured in a closure, so the router is built once.
- The chat body is a dependency (`chat_request`): read with its size counted as it arrives, parsed
  by the strict parser, then validated into `ChatRequest`; a failure raises, and the app's handlers
  answer it. FastAPI's own (lenient) JSON decoding never sees the body.
- Each of the `n` choices is an engine request with a callback that forwards its deltas to an asyncio
  queue on this loop. Vision preprocessing and constraint compilation run in the thread pool.
- `stream: true` answers with server-sent events (chat.completion.chunk), ending with a usage chunk
  and `[DONE]`; a failure while streaming is an `{"error": ...}` event. A client that goes away
  (streaming or not) cancels its requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from nanovl.engine.constrained import compile_constraint
from nanovl.engine.reasoning import split_reasoning
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
    ConvertRequest,
    ExtractRequest,
    Limits,
    PagesRequest,
    decode_embeds,
    parse_body,
    parse_messages,
    parse_response_format,
    resolve_source,
    sampling_fields,
    too_large,
)

router = APIRouter()


@dataclass
class Server:
    """What the routes need, on `app.state.server`."""

    model: object  # a loaded nanovl model: VisionLanguageModel or a text-only one
    name: str  # the served model name
    scheduler: Scheduler
    processor: Processor | None  # None for a text-only model
    limits: Limits
    metrics: Metrics
    allowed: Path | None  # the folder local media paths must be in (None: no local paths)
    allow_remote: bool
    request_timeout: float | None
    stall_timeout: float  # /health is 503 when one engine step takes longer
    max_chars: int  # a prompt of more characters cannot fit one slot, whatever it tokenises to


def state(request: Request) -> Server:
    return request.app.state.server


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is over `limit` (a body without Content-Length is not checked
    by the middleware)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


async def chat_request(request: Request) -> ChatRequest:
    """The chat body: read within the size limit, parsed strictly, validated (a ValidationError is
    answered by the app's handler)."""
    raw = await read_body(request, state(request).limits.max_body_bytes)
    return ChatRequest.model_validate(parse_body(raw))


@router.get("/health")
async def health(request: Request):
    server = state(request)
    sched = server.scheduler
    problem = sched.health(server.stall_timeout)
    body = {"status": "ok" if problem is None else "unhealthy", "model": server.name, "running": sched.running,
            "queued": sched.queue_depth, "restarts": sched.stats["restarts"]}  # fmt: skip
    if problem is not None:
        body["reason"] = problem
    return JSONResponse(body, status_code=200 if problem is None else 503)


@router.get("/metrics")
async def prometheus(request: Request):
    return Response(state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request):
    name = state(request).name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nanovl"}]}


@router.post("/v1/chat/completions")
async def chat(request: Request, req: Annotated[ChatRequest, Depends(chat_request)]):
    server = state(request)
    if req.model != server.name:
        raise APIError(404, f"model {req.model!r} does not exist; this server has {server.name!r}",
                       code="model_not_found")  # fmt: skip
    if req.max_tiles is not None and not 1 <= req.max_tiles <= server.limits.max_tiles:
        raise APIError(400, f"max_tiles must be in [1, {server.limits.max_tiles}] on this server", param="max_tiles")
    model = server.model
    try:
        fmt = parse_response_format(req.response_format)
        params = model.params(**sampling_fields(req), json_schema=(fmt["schema"] or True) if fmt else None)
        prompt_ids, embeds = await run_in_threadpool(build_prompt, server, req, params.max_new_tokens)
        constraint = None
        if fmt is not None:  # compiled (and probed) here: a schema the enforcer cannot take is a 400
            args = (model.tokenizer, model.model.config.vocab_size, fmt["schema"], prompt_ids)
            constraint = await run_in_threadpool(compile_constraint, *args)
    except NanovlError as e:
        raise APIError(400, str(e)) from None
    top = (req.top_logprobs or 0) if req.logprobs else None
    reqs, queues = submit(server, req.n, prompt_ids, params, embeds=embeds, top_logprobs=top, constraint=constraint)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        return EventSourceResponse(stream_events(server, req, reqs, queues, rid, created), ping=15)
    gathered = asyncio.gather(*(collect(server, r, q, i) for i, (r, q) in enumerate(zip(reqs, queues))))
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
                server.scheduler.cancel(r)
    failed = next((r for r in reqs if r.finish_reason == "error"), None)
    if failed is not None:
        raise APIError(500, f"generation failed: {failed.error}", type="server_error")
    completion = sum(len(r.output) for r in reqs)
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
             "total_tokens": len(prompt_ids) + completion}  # fmt: skip
    return {"id": rid, "object": "chat.completion", "created": created, "model": server.name, "choices": choices,
            "usage": usage}  # fmt: skip


async def extract_request(request: Request) -> ExtractRequest:
    raw = await read_body(request, state(request).limits.max_body_bytes)
    return ExtractRequest.model_validate(parse_body(raw))


@router.post("/v1/extract")
async def extract(request: Request, req: Annotated[ExtractRequest, Depends(extract_request)]):
    """Grounded extraction (documents/extract.py) of one document, decoded by the scheduler like any
    chat request: {"fields": {name: {"value", "confidence", "evidence"}}, "pages", "raw", "usage"}."""
    from nanovl.documents.extract import (
        bounded,
        check_extract_schema,
        extract_prompt,
        fields_schema,
        find_calibration,
        finish_extraction,
        token_budget,
    )

    server = state(request)
    if req.model is not None and req.model != server.name:
        raise APIError(404, f"model {req.model!r} does not exist; this server has {server.name!r}",
                       code="model_not_found")  # fmt: skip
    if server.processor is None:
        raise APIError(400, f"model {server.name!r} is text-only: it cannot read documents")
    if req.max_tiles is not None and not 1 <= req.max_tiles <= server.limits.max_tiles:
        raise APIError(400, f"max_tiles must be in [1, {server.limits.max_tiles}] on this server", param="max_tiles")
    if (req.schema_ is None) == (req.fields is None):
        raise APIError(400, "give the fields to extract as schema (a JSON schema) or fields (names), one of them")
    model, limits = server.model, server.limits

    def prepare():
        schema = check_extract_schema(req.schema_) if req.schema_ is not None else fields_schema(req.fields)
        src = resolve_source(req.document, server.allowed, server.allow_remote)
        media = scan_source(src, req.pages, DEFAULT_DPI, limits.max_image_pixels, max_pages=limits.max_media,
                            video=False)  # fmt: skip
        enforced = bounded(schema)
        budget = req.max_tokens or token_budget(enforced)
        params = model.params(max_new_tokens=budget, temperature=0.0, json_schema=enforced, stop=None)
        prompt = server.processor.prepare(media, extract_prompt(schema), req.max_tiles, None, params.max_new_tokens)
        constraint = compile_constraint(model.tokenizer, model.model.config.vocab_size, params.json_schema, prompt.ids)
        return src, media, params, prompt, constraint

    try:
        src, media, params, prompt, constraint = await run_in_threadpool(prepare)
    except NanovlError as e:
        raise APIError(400, str(e)) from None
    text, offsets, logprobs, finish, er = await complete_one(server, prompt, params, constraint)
    calibration = find_calibration(getattr(model, "path", None))
    try:
        result = await run_in_threadpool(finish_extraction, text, offsets, logprobs, finish, src, req.pages,
                                         DEFAULT_DPI, media, calibration)  # fmt: skip
    except NanovlError as e:
        raise APIError(400, str(e)) from None
    usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": len(er.output),
             "total_tokens": len(prompt.ids) + len(er.output)}  # fmt: skip
    return {"id": f"extract-{uuid.uuid4().hex[:24]}", "object": "extraction", "model": server.name, **result,
            "usage": usage}  # fmt: skip


async def complete_one(server: Server, prompt, params, constraint=None):
    """One greedy answer through the scheduler -> (text, token spans, logprobs, finish reason, request)."""
    (er,), (q,) = submit(server, 1, prompt.ids, params, embeds=prompt.embeds, top_logprobs=0, constraint=constraint)
    text, offsets, logprobs = "", [], []
    try:
        while True:
            d = await q.get()
            if d.finish_reason == "error":
                raise APIError(500, f"generation failed: {d.error}", type="server_error")
            offsets.append((len(text), len(text) + len(d.text)))
            logprobs.append(d.logprobs["logprob"] if d.logprobs else 0.0)
            text += d.text
            if d.finish_reason is not None:
                return text, offsets, logprobs, d.finish_reason, er
    finally:
        if er.finish_reason is None:
            server.scheduler.cancel(er)


def document_pages(server: Server, document: str, pages: str | None, dpi: float = DEFAULT_DPI):
    """A request's document (a data: URL, or a path / URL where allowed) -> (source, its pages), within
    the server's limits."""
    src = resolve_source(document, server.allowed, server.allow_remote)
    limits = server.limits
    return src, scan_source(src, pages, dpi, limits.max_image_pixels, max_pages=limits.max_media, video=False)


@router.post("/v1/convert")
async def convert(request: Request):
    """Pages as Markdown, page by page (documents/convert.py's prompt), with sanitised HTML."""
    from nanovl.documents.convert import PROMPT, blocks, page_number, to_html

    server = state(request)
    req = ConvertRequest.model_validate(parse_body(await read_body(request, server.limits.max_body_bytes)))
    if req.model is not None and req.model != server.name:
        raise APIError(404, f"model {req.model!r} does not exist; this server has {server.name!r}",
                       code="model_not_found")  # fmt: skip
    if server.processor is None:
        raise APIError(400, f"model {server.name!r} is text-only: it cannot read documents")
    try:
        _, media = await run_in_threadpool(document_pages, server, req.document, req.pages)
    except NanovlError as e:
        raise APIError(400, str(e)) from None
    params = server.model.params(max_new_tokens=req.max_tokens, temperature=0.0, stop=None)
    out = []
    for k, page in enumerate(media):  # one page at a time: each rendered when its turn comes
        try:
            prompt = await run_in_threadpool(server.processor.prepare, [page], PROMPT, None, None, req.max_tokens)
        except NanovlError as e:
            raise APIError(400, str(e)) from None
        text, _, _, finish, _ = await complete_one(server, prompt, params)
        text = split_reasoning(text)[1].strip()
        out.append({"page": page_number(page, k), "markdown": text, "html": to_html(text), "blocks": blocks(text),
                    "finish_reason": finish})  # fmt: skip
    return {"object": "conversion", "model": server.name, "pages": out}


@router.post("/v1/pages")
async def pages(request: Request):
    """The pages of a document rendered as PNG data: URLs, with their size in page units (points for
    PDFs, pixels for images) and the tile plan the model would use (as `nanovl tiles`)."""
    import base64
    import io

    from nanovl.documents.convert import page_number
    from nanovl.tiling import plan_tiles

    server = state(request)
    req = PagesRequest.model_validate(parse_body(await read_body(request, server.limits.max_body_bytes)))
    if server.processor is None:
        raise APIError(400, f"model {server.name!r} is text-only: it has no tiles")

    def render():
        _, units = document_pages(server, req.document, req.pages, 72.0)  # sizes in points (pixels: images)
        _, asked = document_pages(server, req.document, req.pages, DEFAULT_DPI)  # what a request would tile
        _, shown = document_pages(server, req.document, req.pages, req.dpi)
        out = []
        for k, (unit, model_page, page) in enumerate(zip(units, asked, shown)):
            image = page.load()
            buf = io.BytesIO()
            image.save(buf, "PNG")
            plan = plan_tiles(server.processor.tiles, *model_page.size, max_tiles=req.max_tiles)
            out.append({"page": page_number(page, k), "width": image.width, "height": image.height,
                        "units": list(unit.size), "tiles": plan.as_dict(),
                        "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()})  # fmt: skip
        return out

    try:
        return {"object": "pages", "pages": await run_in_threadpool(render)}
    except NanovlError as e:
        raise APIError(400, str(e)) from None


def submit(server: Server, n: int, prompt_ids, params, **kw) -> tuple[list[EngineRequest], list[asyncio.Queue]]:
    """`n` engine requests for one prompt (seeds seed, seed+1, ... within SEED_RANGE), each with a queue
    its deltas arrive on. A full queue is a 429 and frees the ones already submitted."""
    sched, reqs, queues = server.scheduler, [], []
    loop = asyncio.get_running_loop()
    lo, span = SEED_RANGE[0], SEED_RANGE[1] - SEED_RANGE[0]
    for i in range(n):
        q: asyncio.Queue = asyncio.Queue()
        seeded = (
            params
            if params.seed is None or i == 0
            else type(params)(**{**params.__dict__, "seed": (params.seed + i - lo) % span + lo})
        )
        er = EngineRequest(prompt_ids, seeded, lambda d, q=q: loop.call_soon_threadsafe(q.put_nowait, d),
                           timeout=server.request_timeout, **kw)  # fmt: skip
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
    return reqs, queues


async def disconnected(request: Request):
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def build_prompt(server: Server, req: ChatRequest, reserve: int):
    """Messages -> prompt ids (and merged embeddings). Media are sized from their headers and
    checked against the server's limits before anything is decoded; the prompt's length is checked
    by prepare_chat before any page is rendered."""
    tokenizer, limits, sched = server.model.tokenizer, server.limits, server.scheduler
    messages, refs = parse_messages(req.messages, tokenizer.escape)
    chars = sum(len(m["content"]) for m in messages)
    if chars > server.max_chars:
        raise APIError(400, f"the messages hold {chars} characters, more than a {sched.max_len}-token "
                            "context can take", code="context_length_exceeded")  # fmt: skip
    if not refs:
        return tokenizer.encode_chat(messages), None
    if server.processor is None:
        raise APIError(400, f"model {server.name!r} is text-only: it takes no images, documents or videos")
    media, counts = [], []
    for ref in refs:
        room = limits.max_media - len(media)
        if room <= 0:
            raise APIError(400, f"more than {limits.max_media} images, pages and videos in one request")
        if ref.kind == "embeds":
            media.append(ImageEmbeds(decode_embeds(ref.data)))
            counts.append(1)
            continue
        src = resolve_source(ref.url, server.allowed, server.allow_remote)
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
    prompt = server.processor.prepare_chat(expand_documents(messages, counts), media, req.max_tiles, max(reserve, 1))
    return prompt.ids, prompt.embeds


async def collect(server: Server, er: EngineRequest, q: asyncio.Queue, index: int) -> dict:
    """One choice of a non-streaming answer, from its queue of deltas."""
    text, logprobs = [], []
    while True:
        d = await q.get()
        if not text:
            server.metrics.note_first_token(er)
        text.append(d.text)
        if d.logprobs is not None:
            logprobs.append(logprob_entry(server.model.tokenizer, d))
        if d.finish_reason is not None:
            break
    message = {"role": "assistant", "content": "".join(text)}
    reasoning, answer = split_reasoning(message["content"])
    if reasoning is not None:
        message = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    choice = {"index": index, "message": message, "finish_reason": openai_reason(d.finish_reason)}
    choice["logprobs"] = {"content": logprobs} if er.top_logprobs is not None else None
    return choice


async def stream_events(server: Server, req: ChatRequest, reqs, queues, rid: str, created: int):
    """The SSE events of a streamed answer: a role chunk per choice, content chunks as the deltas of
    all choices arrive, the usage chunk (unless stream_options says no) and `[DONE]`."""

    def chunk(choices, usage=None):
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name,
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
                    server.metrics.count_error()
                    yield json.dumps(APIError(500, f"generation failed: {d.error}", type="server_error").body())
                    return
                server.metrics.note_first_token(reqs[i])
                choice = {"index": i, "delta": {"content": d.text} if d.text else {}, "finish_reason": None}
                if d.logprobs is not None:
                    choice["logprobs"] = {"content": [logprob_entry(server.model.tokenizer, d)]}
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
                server.scheduler.cancel(r)


def logprob_entry(tk, d) -> dict:
    entry = {"token": tk.decode([d.logprobs["token"]]), "logprob": d.logprobs["logprob"], "bytes": None}
    entry["top_logprobs"] = [
        {"token": tk.decode([t]), "logprob": lp, "bytes": None} for t, lp in d.logprobs.get("top", [])
    ]
    return entry


def openai_reason(reason: str | None) -> str | None:
    return {"cancelled": "abort", "timeout": "length"}.get(reason, reason)
