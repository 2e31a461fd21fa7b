"""Where the document workflows get their answers: a model loaded here, or an OpenAI-compatible server.

Both take the same thing (pages, one prompt, a token budget, optionally a JSON schema) and give the
same `Answer`: the text, the character span and log-probability of each token, the finish reason.
A server only ever receives images: pages are rendered here (PNG), so any endpoint that takes
`image_url` parts works (`nanovl serve`, or vLLM serving the real checkpoints on a GPU box).
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass

from nanovl.engine.reasoning import split_reasoning
from nanovl.errors import NanovlError


@dataclass
class Answer:
    text: str
    offsets: list[tuple[int, int]]  # per token: its characters in `text` (empty when a <think> block was cut)
    logprobs: list[float]  # per token: log-probability under the model (OpenAI's `logprobs`)
    finish_reason: str | None
    prompt_tokens: int = 0


def token_offsets(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Character spans of the tokens of `text` from their texts (an endpoint's logprobs): in order,
    each found from where the last one ended (a piece that does not occur gets an empty span)."""
    spans, at = [], 0
    for piece in pieces:
        i = text.find(piece, at) if piece else -1
        if i < 0:
            spans.append((at, at))
            continue
        spans.append((i, i + len(piece)))
        at = i + len(piece)
    return spans


class LocalBackend:
    """A VisionLanguageModel in this process. One answer at a time (a lock), greedy."""

    def __init__(self, model):
        if not hasattr(model, "processor"):  # a TextModel (nanovl.api; not imported: api imports this)
            raise NanovlError(f"{model.path} is a text-only model; documents need a vision-language checkpoint")
        self.model, self.lock, self.path = model, threading.Lock(), model.path
        self.name = str(model.path)

    def complete(self, media, prompt: str, max_tokens: int, schema: dict | None = None, max_tiles=None) -> Answer:
        from nanovl.engine import stream

        m = self.model
        params = m.params(max_new_tokens=max_tokens, temperature=0.0, json_schema=schema, stop=None)
        with self.lock:
            p = m.prepare(media, prompt, max_tiles, None, params.max_new_tokens)
            text, offsets, logprobs, finish = "", [], [], None
            for d in stream(m.model, m.tokenizer, [p.ids], params, embeds=[p.embeds], top_logprobs=0):
                offsets.append((len(text), len(text) + len(d.text)))
                logprobs.append(d.logprobs["logprob"])
                text += d.text
                finish = d.finish_reason or finish
        if schema is None:  # a reasoning model's <think> block is not the answer (the server splits it off too)
            reasoning, answer = split_reasoning(text)
            if reasoning is not None:
                text, offsets, logprobs = answer, [], []
        return Answer(text, offsets, logprobs, finish, len(p.ids))


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def openai_client(url: str, api_key: str | None, model: str | None, timeout: float):
    """An OpenAI client for `url` and the model to ask for (`model`, else the endpoint's first)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key or "none", max_retries=2, timeout=timeout)
    try:
        return client, model or client.models.list().data[0].id
    except Exception as e:  # the openai client raises many kinds; say what failed, once
        raise NanovlError(f"{url}: cannot list the endpoint's models ({e})") from None


class EndpointBackend:
    """An OpenAI-compatible server: one chat completion per call, pages as PNG image parts; safe to
    call from several threads (the client is)."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600):
        self.client, self.name = openai_client(url, api_key, model, timeout)
        self.path = None

    def complete(self, media, prompt: str, max_tokens: int, schema: dict | None = None, max_tiles=None) -> Answer:
        parts = []
        for page in media:  # the user turn `ask` writes: one line per image, then the prompt
            parts += [{"type": "image_url", "image_url": {"url": png_data_url(page.load())}},
                      {"type": "text", "text": "\n"}]  # fmt: skip
        if parts:
            parts[-1]["text"] += prompt
        else:
            parts = [{"type": "text", "text": prompt}]
        kw = {}
        if schema is not None:
            kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "fields", "schema": schema}}
        if max_tiles:
            kw["extra_body"] = {"max_tiles": max_tiles}
        try:
            r = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": parts}], max_tokens=max_tokens,
                temperature=0.0, logprobs=True, **kw,
            )  # fmt: skip
        except Exception as e:  # the openai client raises many kinds; say which request failed
            raise NanovlError(f"{self.client.base_url}: the request failed ({e})") from None
        choice = r.choices[0]
        text = choice.message.content or ""
        content = (choice.logprobs.content or []) if choice.logprobs else []
        usage = r.usage.prompt_tokens if r.usage else 0
        return Answer(text, token_offsets(text, [t.token for t in content]), [t.logprob for t in content],
                      choice.finish_reason, usage)  # fmt: skip
