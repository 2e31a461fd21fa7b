"""Single-stream generation: prefill, then one decode step at a time, for a batch of prompts of
different lengths (the CLI, the Python API and eval's local backend; the server uses the scheduler).

- `TokenGenerator` runs the model: prompts are left-padded to one length; padding slots are masked
  out of attention and rotary positions count from each row's first real token, so a padded row
  computes what it would alone. Each row samples and stops through its own `TokenStep`
  (engine/step.py, shared with the scheduler); each iteration yields every row's new token id (None
  once the row is finished), and `deltas` holds the same step's Deltas (text, finish reason).
- `stream` yields the Deltas one by one; `generate` collects them into one `Completion` per prompt.
- Too long is an error, never a silent truncation: a prompt that fills the context raises, and
  generation ends with finish_reason "length" when the context is full.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nanovl.engine.constrained import constraint_for
from nanovl.engine.reasoning import split_reasoning
from nanovl.engine.sampling import SamplingParams
from nanovl.engine.step import Delta, TokenStep
from nanovl.errors import RequestError
from nanovl.models.layers import causal_mask


class TokenGenerator:
    """embeds: optional per-prompt input embeddings (len(prompt), C) used for the prefill instead of
    looking the prompt ids up (a VLM's prompt with image embeddings merged in). tokenizer: for text
    and stop strings (None: token ids only). top_logprobs: as the scheduler's (None: no log-probabilities;
    0: each chosen token's own)."""

    def __init__(self, model, prompts: list[list[int]], params: SamplingParams, eos_ids=(), context_len=None,
                 embeds=None, constraint=None, tokenizer=None, top_logprobs=None):  # fmt: skip
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("every prompt needs at least one token")
        cfg = model.config
        self.model = model
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
        self.prompts, self.embeds = prompts, embeds
        room = self.context_len - longest  # every row's cache is padded to the longest prompt
        self.steps = [TokenStep(p, params, eos_ids, room, tokenizer, constraint, top_logprobs, model.device)
                      for p in prompts]  # fmt: skip
        self.logits: torch.Tensor | None = None  # (B, V) float32 model logits behind the last yielded tokens
        self.deltas: list[Delta | None] = []  # the last yielded step's Deltas

    @property
    def finish_reason(self) -> list[str | None]:
        return [s.finish_reason for s in self.steps]

    @property
    def output_ids(self) -> list[list[int]]:
        return [s.output for s in self.steps]

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        model = self.model
        device = model.device
        B, L = len(self.prompts), max(len(x) for x in self.prompts)
        pads = torch.tensor([L - len(x) for x in self.prompts], device=device)
        padded = pads.any().item()
        tokens = torch.zeros(B, L, dtype=torch.long, device=device)
        for i, x in enumerate(self.prompts):
            tokens[i, L - len(x) :] = torch.tensor(x, device=device)
        total = L + max(s.limit for s in self.steps)
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
        last = [0] * B  # the token each row feeds next (a finished row repeats its last one)
        for pos in range(L, total):
            self.logits = logits
            self.deltas = [None if s.finish_reason else s(logits[i], i) for i, s in enumerate(self.steps)]
            yield [d.token_id if d else None for d in self.deltas]
            if all(s.finish_reason for s in self.steps):
                return
            last = [d.token_id if d else t for d, t in zip(self.deltas, last)]
            mask = valid[:, None, None, : pos + 1] if padded else None  # (B, 1, 1, S)
            next_ids = torch.tensor(last, device=device)[:, None]
            logits = model(next_ids, (pos - pads)[:, None], cache, mask)[:, -1].float()


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


def stream(
    model, tokenizer, prompts: list[list[int]], params: SamplingParams, context_len=None, embeds=None,
    top_logprobs: int | None = None,
) -> Iterator[Delta]:
    constraint = constraint_for(tokenizer, model.config.vocab_size, params, prompts[0] if prompts else [])
    gen = TokenGenerator(model, prompts, params, tokenizer.eos_token_ids, context_len, embeds, constraint, tokenizer,
                         top_logprobs)  # fmt: skip
    for _ in gen:
        yield from (d for d in gen.deltas if d is not None)


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
