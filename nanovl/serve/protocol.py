"""The OpenAI chat-completions request, parsed and checked; errors in OpenAI's shape.

Content parts: `text`; `image_url` (data: URLs always; local paths only under the allowed folder;
http(s) is refused until remote media is enabled); `video_url` (same sources); and OpenAI's `file`
part for PDFs (`file_data` as a data: URL, with nanovl's optional `pages` range, e.g. "1-3").

- Bodies are parsed strictly (`parse_body`): UTF-8, standard JSON (no NaN / Infinity), nesting at
  most MAX_DEPTH deep, at most `Limits.max_body_bytes`; then validated into `ChatRequest`.
- Unknown fields are refused, and so are OpenAI fields that nanovl does not implement when they ask
  for something (`frequency_penalty: 0.5`, `tools`, ...).
- A validation failure is one 400 (`invalid`): "loc: msg" of the first error, `param` its dotted
  location.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nanovl.engine.constrained import check_schema
from nanovl.errors import RequestError

MAX_DEPTH = 32  # JSON nesting of a request body (a chat request needs 6; a JSON schema rarely 10)


@dataclass
class Limits:
    """What one request may ask of the server; everything is checked before any page is rendered."""

    max_body_bytes: int = 64 << 20  # the request body (base64 media inflates files by 4/3)
    max_media: int = 32  # images + PDF pages + videos in one request
    max_videos: int = 2
    max_image_pixels: int = 64_000_000  # one image or rendered page (a 600-DPI Letter page is 34 MP)
    max_request_pixels: int = 256_000_000  # all images and rendered pages of one request together
    max_tiles: int = 48  # the per-image tile budget a request may ask for (`max_tiles`)


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the limit of {limit} bytes", code="too_large")


def invalid(errors: list[dict]) -> APIError:
    """Validation errors (pydantic's `errors()`) -> the 400: the first one as "loc: msg", `param` the
    dotted location (None for an error of the whole body)."""
    first = errors[0]
    where = ".".join(str(x) for x in first["loc"])
    return APIError(400, f"{where + ': ' if where else ''}{first['msg']}", param=where or None)


class StreamOptions(BaseModel):
    include_usage: bool = True


# OpenAI fields that nanovl does not implement: refused unless they ask for nothing (their default).
UNSUPPORTED = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "web_search_options": None,
    "reasoning_effort": None,
}
IGNORED = ("user", "metadata", "store", "service_tier")  # bookkeeping fields: accepted, no effect


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if not isinstance(data, dict):
            return data
        for key, default in UNSUPPORTED.items():
            value = data.get(key)
            if value is not None and value != default and value != {} and value != []:
                raise ValueError(f"{key} is not supported by nanovl (see the README's list of supported fields)")
        return {k: v for k, v in data.items() if k not in UNSUPPORTED and k not in IGNORED}

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    max_tiles: int | None = None  # nanovl: per-image tile budget
    ignore_eos: bool = False  # as vLLM: keep generating past end-of-sequence


class ExtractRequest(BaseModel):
    """POST /v1/extract: one document (a data: URL, or a path / URL where the server allows them) and
    the fields to extract, as a JSON schema or as names."""

    model_config = {"extra": "forbid"}
    model: str | None = None
    document: str = Field(min_length=1)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    fields: str | list[str] | None = None
    pages: str | None = None
    max_tiles: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)  # None: what the schema can need


class PagesRequest(BaseModel):
    """POST /v1/pages: a document's pages rendered as PNG, each with the tile grid the model would use."""

    model_config = {"extra": "forbid"}
    document: str = Field(min_length=1)
    pages: str | None = None
    dpi: float = Field(default=96, gt=0, le=300)
    max_tiles: int | None = None


class ConvertRequest(BaseModel):
    """POST /v1/convert: pages of a document as Markdown (and sanitised HTML)."""

    model_config = {"extra": "forbid"}
    model: str | None = None
    document: str = Field(min_length=1)
    pages: str | None = None
    max_tokens: int = Field(default=2048, ge=1)


class MediaRef(BaseModel):
    kind: Literal["image", "video", "document", "embeds"]
    url: str = ""
    pages: str | None = None
    data: Any = None  # image_embeds: base64 of a safetensors file with one (rows, hidden) tensor, or a list


def parse_body(raw: bytes) -> dict:
    """The request body as JSON: UTF-8, no NaN / Infinity, nesting at most MAX_DEPTH."""

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8") from None
    except RecursionError:
        raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if depth(body) > MAX_DEPTH:
        raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep")
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def _field(part: dict, key: str, kind: type, where: str, required: bool = True):
    """part[key], which must be a non-empty string (kind str) or an object (kind dict)."""
    value = part.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or not value:
        what = "a non-empty string" if kind is str else "an object"
        raise APIError(400, f"{where}.{key} must be {what}", param="messages")
    return value


def parse_messages(messages: list[dict], escape=lambda text: text) -> tuple[list[dict], list[MediaRef]]:
    """Chat messages with content parts -> template messages whose text holds one `<image>` / `<video>`
    / `<document>` placeholder per media part, and the media references in order.

    escape: applied to user and system text (Tokenizer.escape: typed special tokens and
    placeholders stay text), never to the placeholders put here. Assistant turns are left as they
    are: chat templates read them (a reasoning model's drops its earlier `<think>` blocks)."""
    out, media = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant", param="messages")
        role = "system" if role == "developer" else role
        esc = escape if role != "assistant" else (lambda text: text)
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": esc(content or "")})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        text = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(esc(_field(part, "text", str, where, required=False) or ""))
            elif kind in ("image_url", "video_url"):
                value = part.get(kind)
                url = _field(value, "url", str, f"{where}.{kind}") if isinstance(value, dict) else value
                if not isinstance(url, str) or not url:
                    raise APIError(400, f"{where}: a {kind} part needs a url (a string)", param="messages")
                media.append(MediaRef(kind=kind.split("_")[0], url=url))
                text.append("<image>" if kind == "image_url" else "<video>")
            elif kind == "image_embeds":
                data = part.get("image_embeds")
                data = data.get("data") if isinstance(data, dict) else data
                if not isinstance(data, (str, list)) or not data:
                    raise APIError(400, f"{where}: image_embeds needs data (base64 or a list)", param="messages")
                media.append(MediaRef(kind="embeds", data=data))
                text.append("<image>")
            elif kind == "file":
                f = _field(part, "file", dict, where)
                url = _field(f, "file_data", str, f"{where}.file")
                pages = _field(f, "pages", str, f"{where}.file", required=False)
                media.append(MediaRef(kind="document", url=url, pages=pages))
                text.append("<document>")
            else:
                raise APIError(400, f"{where}: unsupported content part type {kind!r}", param="messages")
        out.append({"role": role, "content": "".join(text)})
    return out, media


def resolve_source(url: str, allowed_local: Path | None, allow_remote: bool):
    """A media URL -> something nanovl.media reads (a data: URL string or a local Path)."""
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise APIError(400, "remote media URLs are disabled on this server (start it with --allow-remote-media)")
        return fetch_remote(url)
    if allowed_local is None:
        raise APIError(400, "local media paths are disabled on this server (see --allowed-local-media-path)")
    name = url[len("file://") :] if url.startswith("file://") else url
    if "\x00" in name:
        raise APIError(400, "a media path cannot contain a NUL character")
    root = allowed_local.resolve()
    inside = lambda p: p == root or root in p.parents  # noqa: E731
    # outside the folder is 403 whether or not the file exists (no probing of the file system);
    # the lexical check first, then again after symlinks are followed
    if not inside(Path(os.path.abspath(root / name))):
        raise APIError(403, f"{url} is outside the allowed media folder", code="forbidden_path")
    try:
        resolved = (root / name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise APIError(400, f"{url}: no such file") from None
    if not inside(resolved):
        raise APIError(403, f"{url} is outside the allowed media folder", code="forbidden_path")
    if not resolved.is_file():
        raise APIError(400, f"{url}: not a file")
    return resolved


def sampling_fields(req: ChatRequest) -> dict:
    """OpenAI fields -> SamplingParams fields (None: the model's default)."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and max_tokens <= 0:
        raise RequestError("max_tokens must be at least 1")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    fields = dict(
        max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, seed=req.seed, stop=stop,
        ignore_eos=req.ignore_eos or None,
    )  # fmt: skip
    return {k: v for k, v in fields.items() if v is not None}


def parse_response_format(response_format: dict | None) -> dict | None:
    """OpenAI `response_format` -> {"schema": dict | None} for JSON modes, None for plain text."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"schema": None}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise RequestError("response_format json_schema needs json_schema.schema")
        return {"schema": check_schema(schema)}
    raise RequestError(f"unknown response_format type {kind!r} (text, json_object, json_schema)")


def decode_embeds(data) -> torch.Tensor:
    """image_embeds data -> a float tensor; shape checks are the processor's (Processor.check_embeds)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if isinstance(data, list):
        try:
            return torch.tensor(data, dtype=torch.float32)
        except (TypeError, ValueError):
            raise APIError(400, "image_embeds data must be a rectangular list of numbers") from None
    try:
        tensors = load(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError, SafetensorError):
        raise APIError(400, "image_embeds data must be base64 of a safetensors file (or a list of lists)") from None
    if len(tensors) != 1:
        raise APIError(400, f"image_embeds safetensors must hold one tensor, not {len(tensors)}")
    return next(iter(tensors.values())).float()


MAX_REMOTE_BYTES = 64 << 20


def is_public(ip) -> bool:
    """A globally routable unicast address: not private, loopback, link-local, shared (CGNAT,
    100.64.0.0/10), reserved or multicast, and for IPv6 no tunnel (6to4, Teredo, mapped or
    translated IPv4) that leads to one."""
    import ipaddress

    if not ip.is_global or ip.is_multicast:
        return False
    if ip.version == 6:
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in ipaddress.ip_network("64:ff9b::/96") or ip in ipaddress.ip_network("64:ff9b:1::/48"):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(is_public(a) for a in embedded if a is not None)
    return True


def public_addresses(host: str) -> list[str]:
    """The host's addresses after DNS resolution; refuses the host if any of them is not public
    (`is_public`), so a name cannot point the server at itself or its network."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise APIError(400, f"cannot resolve {host}: {e}") from None
    addresses = sorted({info[4][0] for info in infos})
    for a in addresses:
        if not is_public(ipaddress.ip_address(a.split("%")[0])):
            raise APIError(400, f"{host} resolves to {a}, a non-public address: refused", code="forbidden_address")
    if not addresses:
        raise APIError(400, f"{host} has no address")
    return addresses


def fetch_remote(url: str, transport=None, hops: int = 3) -> bytes:
    """GET a public http(s) URL: every host (redirects included) is resolved once and checked with
    `public_addresses`, and the connection goes to the address that was checked (a second lookup
    could answer differently: DNS rebinding). TLS still verifies the certificate for the host name
    (SNI). At most MAX_REMOTE_BYTES."""
    from urllib.parse import urljoin, urlparse

    import httpx

    for _ in range(hops + 1):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise APIError(400, f"{url}: only http(s) URLs with a host name")
        host = parsed.hostname
        address = public_addresses(host)[0]
        pinned = httpx.URL(url).copy_with(host=address)
        headers = {"Host": parsed.netloc.rpartition("@")[2]}
        try:
            with httpx.Client(transport=transport, follow_redirects=False, timeout=20) as client:
                request = client.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": host})
                r = client.send(request, stream=True)
                try:
                    if r.is_redirect:
                        url = urljoin(url, r.headers.get("location", ""))
                        continue
                    if r.status_code != 200:
                        raise APIError(400, f"{url}: the server answered {r.status_code}")
                    data = bytearray()
                    for chunk in r.iter_bytes():
                        data += chunk
                        if len(data) > MAX_REMOTE_BYTES:
                            raise APIError(400, f"{url}: more than {MAX_REMOTE_BYTES >> 20} MB")
                    return bytes(data)
                finally:
                    r.close()
        except httpx.HTTPError as e:
            raise APIError(400, f"{url}: cannot fetch ({e})") from None
    raise APIError(400, f"{url}: too many redirects")
