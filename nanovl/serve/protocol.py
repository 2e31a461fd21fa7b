"""The OpenAI chat-completions request, parsed and checked; errors in OpenAI's shape.

Content parts: `text`; `image_url` (data: URLs always; local paths only under the allowed folder;
http(s) is refused until remote media is enabled); `video_url` (same sources); and OpenAI's `file`
part for PDFs (`file_data` as a data: URL, with nanovl's optional `pages` range, e.g. "1-3").
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from nanovl.errors import RequestError


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = True


class ChatRequest(BaseModel):
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


class MediaRef(BaseModel):
    kind: Literal["image", "video", "document", "embeds"]
    url: str = ""
    pages: str | None = None
    data: Any = None  # image_embeds: base64 of a safetensors file with one (rows, hidden) tensor, or a list


def parse_messages(messages: list[dict]) -> tuple[list[dict], list[MediaRef]]:
    """Chat messages with content parts -> template messages whose text holds one `<image>` / `<video>`
    placeholder per media part, and the media references in order."""
    out, media = [], []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant", param="messages")
        role = "system" if role == "developer" else role
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        text = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind in ("image_url", "video_url"):
                url = (part.get(kind) or {}).get("url") if isinstance(part.get(kind), dict) else part.get(kind)
                if not url:
                    raise APIError(400, f"messages[{i}]: a {kind} part needs a url", param="messages")
                media.append(MediaRef(kind=kind.split("_")[0], url=url))
                text.append("<image>" if kind == "image_url" else "<video>")
            elif kind == "image_embeds":
                data = part.get("image_embeds")
                data = data.get("data") if isinstance(data, dict) else data
                if data is None:
                    raise APIError(400, f"messages[{i}]: an image_embeds part needs data", param="messages")
                media.append(MediaRef(kind="embeds", data=data))
                text.append("<image>")
            elif kind == "file":
                f = part.get("file") or {}
                if not f.get("file_data"):
                    raise APIError(400, f"messages[{i}]: a file part needs file_data (a data: URL)", param="messages")
                media.append(MediaRef(kind="document", url=f["file_data"], pages=f.get("pages")))
                text.append("<document>")
            else:
                raise APIError(400, f"messages[{i}]: unsupported content part type {kind!r}", param="messages")
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
    path = Path(url[len("file://") :] if url.startswith("file://") else url)
    if allowed_local is None:
        raise APIError(400, "local media paths are disabled on this server (see --allowed-local-media-path)")
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise APIError(400, f"{url}: no such file") from None
    root = allowed_local.resolve()
    if resolved != root and root not in resolved.parents:
        raise APIError(403, f"{url} is outside the allowed media folder", code="forbidden_path")
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


def decode_embeds(data) -> torch.Tensor:
    """image_embeds data -> a float tensor; shape checks are the model's (VisionLanguageModel.check_embeds)."""
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


def public_addresses(host: str) -> list[str]:
    """The host's addresses after DNS resolution; refuses the host if any is private, loopback,
    link-local, multicast, reserved or unspecified (so a name cannot point the server at itself or
    its network)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise APIError(400, f"cannot resolve {host}: {e}") from None
    addresses = sorted({info[4][0] for info in infos})
    for a in addresses:
        ip = ipaddress.ip_address(a.split("%")[0])
        if (
            ip.is_private
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_reserved
            or ip.is_unspecified
        ):
            raise APIError(400, f"{host} resolves to {a}, a non-public address: refused", code="forbidden_address")
    if not addresses:
        raise APIError(400, f"{host} has no address")
    return addresses


def fetch_remote(url: str, transport=None, hops: int = 3) -> bytes:
    """GET a public http(s) URL: every host (redirects included) is checked with `public_addresses`
    before any connection; at most MAX_REMOTE_BYTES."""
    from urllib.parse import urljoin, urlparse

    import httpx

    for _ in range(hops + 1):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise APIError(400, f"{url}: only http(s) URLs with a host name")
        public_addresses(parsed.hostname)
        try:
            with httpx.Client(transport=transport, follow_redirects=False, timeout=20) as client:
                with client.stream("GET", url) as r:
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
        except httpx.HTTPError as e:
            raise APIError(400, f"{url}: cannot fetch ({e})") from None
    raise APIError(400, f"{url}: too many redirects")
