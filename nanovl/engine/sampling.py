"""Sampling: validated parameters and one pure function from logits to token ids.

Order of the logit processors follows transformers' generate: repetition penalty, temperature,
top-k, top-p, min-p. Temperature 0 means greedy. A seeded `torch.Generator` makes sampling repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nanovl.errors import RequestError

SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes
MIN_PENALTY = 0.01  # repetition penalties outside [0.01, 100] only push logits to overflow


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks, tests)
    json_schema: dict | bool | None = None  # constrain to JSON: a schema, or True for any JSON object

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (
                number(self.temperature) and self.temperature >= 0,
                "temperature must be finite and >= 0 (0 = greedy)",
            ),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (
                number(self.repetition_penalty) and MIN_PENALTY <= self.repetition_penalty <= 1 / MIN_PENALTY,
                f"repetition_penalty must be in [{MIN_PENALTY}, {1 / MIN_PENALTY:.0f}] (1 = off)",
            ),
            (
                self.seed is None or isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1],
                f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1] - 1}]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)
        if isinstance(self.json_schema, dict):
            from nanovl.engine.constrained import check_schema

            check_schema(self.json_schema)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(p: SamplingParams, device) -> torch.Generator | None:
    """The random source of one sampled completion: seeded when asked, fresh otherwise; none for greedy."""
    if p.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(p.seed if p.seed is not None else torch.seed())
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # logits: (B, V) float; seen: (B, V) bool. Positive logits are divided, negative multiplied (CTRL).
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) float32 (after the repetition penalty and any constraint mask) -> (B,) token ids.

    Overflowed logits are clamped and the temperature divides logits shifted to a maximum of 0, so
    any finite temperature > 0 gives a valid distribution (a tiny one: the arg-max). A row with no
    allowed token at all raises RequestError."""
    big = torch.finfo(logits.dtype).max
    logits = logits.nan_to_num(nan=float("-inf"), posinf=big, neginf=float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)
    if not torch.isfinite(top).all():
        raise RequestError("no token is allowed at this step (every logit is -inf)")
    if p.greedy:
        return logits.argmax(dim=-1)
    logits = (logits - top) / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p; the first always stays
        drop = (sorted_probs.cumsum(-1) - sorted_probs) > p.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
