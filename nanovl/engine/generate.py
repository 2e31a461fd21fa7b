"""Generation: prefill, then one decode step at a time, for a batch of prompts of different lengths.

- `TokenGenerator` works on token ids only. Prompts are left-padded to one length; padding slots are
  masked out of attention and rotary positions count from each row's first real token, so a padded row
  computes what it would alone. Each iteration yields the new token of every row (None once a row is
  finished); `stop(row)` ends a row early.
- `stream` adds text: per-row incremental detokenizers, and stop strings cut exactly. Text that could
  be the start of a stop string is held back until it is known not to be one.
- `generate` collects `stream` into one `Completion` per prompt.
- Too long is an error, never a silent truncation: a prompt that fills the context raises, and
  generation ends with finish_reason "length" when the context is full.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nanovl.engine.reasoning import split_reasoning
from nanovl.engine.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample
from nanovl.errors import RequestError
from nanovl.models.layers import causal_mask


class TokenGenerator:
    """embeds: optional per-prompt input embeddings (len(prompt), C) used for the prefill instead of
    looking the prompt ids up (a VLM's prompt with image embeddings merged in)."""

    def __init__(
        self,
        model,
        prompts: list[list[int]],
        params: SamplingParams,
        eos_ids=(),
        context_len=None,
        embeds=None,
        constraint=None,
    ):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("every prompt needs at least one token")
        cfg = model.config
        self.model, self.params = model, params
        self.context_len = context_len or cfg.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest >= self.context_len:
            raise RequestError(
                f"prompt is {longest} tokens, but the model's context is {self.context_len} tokens "
                "(the prompt plus at least one new token must fit)"
            )
        for p in prompts:
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
        if embeds is not None and [len(e) for e in embeds] != [len(p) for p in prompts]:
            raise ValueError("each prompt needs one embedding row per token")
        self.prompts, self.embeds, self.constraint = prompts, embeds, constraint
        self.eos_ids = (set() if params.ignore_eos else set(eos_ids)) | set(params.stop_token_ids)
        self.max_new = min(params.max_new_tokens, self.context_len - longest)
        self.finish_reason: list[str | None] = [None] * len(prompts)
        self.output_ids: list[list[int]] = [[] for _ in prompts]
        self.logits: torch.Tensor | None = None  # (B, V) float32 model logits behind the last yielded tokens

    def stop(self, row: int, reason: str = "stop"):
        if self.finish_reason[row] is None:
            self.finish_reason[row] = reason

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        model, p = self.model, self.params
        device = model.device
        B, L = len(self.prompts), max(len(x) for x in self.prompts)
        pads = torch.tensor([L - len(x) for x in self.prompts], device=device)
        padded = pads.any().item()
        tokens = torch.zeros(B, L, dtype=torch.long, device=device)
        for i, x in enumerate(self.prompts):
            tokens[i, L - len(x) :] = torch.tensor(x, device=device)
        total = L + self.max_new
        cache = model.make_cache(B, total)
        slots = torch.arange(total, device=device)
        valid = slots[None, :] >= pads[:, None]  # (B, total): False on left padding
        mask = None
        if padded:  # causal and real keys only; a padding query sees itself so no row is all -inf
            mask = (causal_mask(L, L, device) & valid[:, None, None, :L]) | torch.eye(
                L, dtype=torch.bool, device=device
            )
        positions = (slots[None, :L] - pads[:, None]).clamp(min=0)  # (B, L)
        x = None
        if self.embeds is not None:
            x = torch.zeros(B, L, model.config.hidden_size, dtype=model.dtype, device=device)
            for i, e in enumerate(self.embeds):
                x[i, L - len(e) :] = e.to(device, model.dtype)
        real = valid[:, :L] if padded else None  # which prompt tokens are real (recurrent layers mask the rest)
        logits = model(tokens, positions, cache, mask, embeds=x, last_only=True, valid=real)[:, -1].float()

        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            for i, x in enumerate(self.prompts):
                seen[i, torch.tensor(x, device=device)] = True
        generator = make_generator(p, device)

        for step in range(self.max_new):
            self.logits = logits
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
            if self.constraint is not None:  # JSON: only tokens that keep each row valid
                rows = [self.constraint.mask(logits[i], x + self.output_ids[i]) for i, x in enumerate(self.prompts)]
                logits = torch.stack(rows)
            next_ids = sample(logits, p, generator)  # (B,)
            out: list[int | None] = []
            for i, t in enumerate(next_ids.tolist()):
                if self.finish_reason[i] is not None:
                    out.append(None)
                    continue
                self.output_ids[i].append(t)
                out.append(t)
                if t in self.eos_ids:
                    self.finish_reason[i] = "stop"
                elif step == self.max_new - 1:
                    self.finish_reason[i] = "length"
            yield out
            if all(r is not None for r in self.finish_reason):
                return
            if seen is not None:
                seen.scatter_(1, next_ids[:, None], True)
            pos = L + step
            mask = valid[:, None, None, : pos + 1] if padded else None  # (B, 1, 1, S)
            logits = model(next_ids[:, None], (pos - pads)[:, None], cache, mask)[:, -1].float()


@dataclass
class Delta:
    index: int  # which prompt of the batch
    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" (| "cancelled" | "timeout" | "error" in the server)
    logprobs: dict | None = None  # {"token", "logprob", "top": [(id, logprob), ...]} when asked for
    error: str | None = None  # with finish_reason "error": what went wrong


@dataclass
class Completion:
    text: str  # everything generated, a reasoning block included
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int

    @property
    def reasoning(self) -> str | None:
        """The `<think>` block of a reasoning model, without its tags; None when there is none."""
        return split_reasoning(self.text)[0]

    @property
    def answer(self) -> str:
        """The text after the reasoning block (all of it when there is none)."""
        return split_reasoning(self.text)[1]


def json_constraint(tokenizer, model, params: SamplingParams):
    """The JSON constraint `params.json_schema` asks for, or None."""
    if params.json_schema is None or params.json_schema is False:
        return None
    from nanovl.engine.constrained import JsonConstraint

    schema = params.json_schema if isinstance(params.json_schema, dict) else {"type": "object"}
    return JsonConstraint(tokenizer, model.config.vocab_size, schema)


class StopText:
    """One row's text: incremental detokenisation and stop strings cut exactly. Text that could be the
    start of a stop string is held back until it is known not to be one."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = tokenizer.decode_stream(skip_special_tokens=True)
        self.stop, self.held = stop, ""
        self.keep = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int, last: bool) -> tuple[str, bool]:
        """The text this token releases, and whether a stop string ended the row here."""
        self.held += self.decoder.step(token)
        if last:
            self.held += self.decoder.finish()
        cut = min((j for j in (self.held.find(s) for s in self.stop) if j >= 0), default=-1)
        if cut >= 0:
            text, self.held = self.held[:cut], ""
            return text, True
        split = len(self.held) if last else max(len(self.held) - self.keep, 0)
        text, self.held = self.held[:split], self.held[split:]
        return text, False


def stream(
    model, tokenizer, prompts: list[list[int]], params: SamplingParams, context_len=None, embeds=None
) -> Iterator[Delta]:
    constraint = json_constraint(tokenizer, model, params)
    gen = TokenGenerator(model, prompts, params, tokenizer.eos_token_ids, context_len, embeds, constraint)
    rows = [StopText(tokenizer, params.stop) for _ in prompts]
    for tokens in gen:
        for i, t in enumerate(tokens):
            if t is None:
                continue
            text, stopped = rows[i].push(t, gen.finish_reason[i] is not None)
            if stopped:
                gen.stop(i, "stop")
            yield Delta(i, text, t, gen.finish_reason[i])


def generate(
    model, tokenizer, prompts: list[list[int]], params: SamplingParams, context_len=None, embeds=None
) -> list[Completion]:
    texts = [""] * len(prompts)
    ids: list[list[int]] = [[] for _ in prompts]
    reasons = [""] * len(prompts)
    for d in stream(model, tokenizer, prompts, params, context_len, embeds):
        texts[d.index] += d.text
        ids[d.index].append(d.token_id)
        reasons[d.index] = d.finish_reason or ""
    return [Completion(texts[i], ids[i], reasons[i], len(prompts[i])) for i in range(len(prompts))]
