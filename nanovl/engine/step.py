"""The per-token step every decode loop shares: one sequence's logits in, its next token and text out.

- Order: repetition penalty -> JSON-constraint mask -> sample -> finish rules. The batch scheduler
  (engine/scheduler.py) and the single-stream generator (engine/generate.py) both call `TokenStep`,
  so the CLI, the Python API, eval and the server sample and stop by the same rules.
- Finish rules, in order: an end-of-sequence id (unless `ignore_eos`) or one of `stop_token_ids` ->
  "stop"; the token limit (`max_new_tokens`, or the room left in the context) -> "length"; a stop
  string -> "stop", wins over the limit. The text is cut exactly at the stop string.
- Text is detokenised incrementally; text that could be the start of a stop string is held back until
  it is known not to be one.
- State per sequence: its seeded generator, the tokens it has seen (for the penalty), its output and
  its text; nothing is shared between sequences except a (stateless) constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovl.engine.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample


@dataclass
class Delta:
    index: int  # which prompt of the batch
    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" (| "cancelled" | "timeout" | "error" in the server)
    logprobs: dict | None = None  # {"token", "logprob", "top": [(id, logprob), ...]} when asked for
    error: str | None = None  # with finish_reason "error": what went wrong


class StopText:
    """One sequence's text: incremental detokenisation and stop strings cut exactly."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = tokenizer.decode_stream(skip_special_tokens=True)
        self.stop, self.held = stop, ""
        self.keep = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int, last: bool) -> tuple[str, bool]:
        """The text this token releases, and whether a stop string ended the sequence here."""
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


class TokenStep:
    """prompt: the sequence's prompt ids; room: how many tokens the context has left after it;
    tokenizer: None for ids only (no text, no stop strings); constraint: a compiled JSON constraint."""

    def __init__(self, prompt: list[int], params: SamplingParams, eos_ids, room: int, tokenizer=None,
                 constraint=None, top_logprobs: int | None = None, device=None):  # fmt: skip
        self.prompt, self.params, self.constraint, self.top_logprobs = prompt, params, constraint, top_logprobs
        self.eos = (set() if params.ignore_eos else set(eos_ids)) | set(params.stop_token_ids)
        self.limit = min(params.max_new_tokens, room)
        self.generator = make_generator(params, device)
        self.text = StopText(tokenizer, params.stop) if tokenizer is not None else None
        self.seen: torch.Tensor | None = None  # (V,) bool, made on the first step when penalised
        self.output: list[int] = []
        self.finish_reason: str | None = None

    def __call__(self, logits: torch.Tensor, index: int = 0) -> Delta:
        """logits: (V,) float32 model logits for the next token -> its Delta (finish_reason set when
        this token ends the sequence)."""
        p = self.params
        scores = logits[None]  # (1, V)
        if p.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                self.seen[torch.tensor(self.prompt, dtype=torch.long, device=logits.device)] = True
            scores = apply_repetition_penalty(scores, self.seen[None], p.repetition_penalty)
        if self.constraint is not None:  # JSON: only tokens that keep the sequence valid
            scores = self.constraint.mask(scores[0], self.prompt + self.output)[None]
        token = int(sample(scores, p, self.generator)[0])
        if self.seen is not None:
            self.seen[token] = True
        self.output.append(token)
        if token in self.eos:
            self.finish_reason = "stop"
        elif len(self.output) >= self.limit:
            self.finish_reason = "length"
        text = ""
        if self.text is not None:
            text, stopped = self.text.push(token, self.finish_reason is not None)
            if stopped:
                self.finish_reason = "stop"
        delta = Delta(index, text, token, self.finish_reason)
        if self.top_logprobs is not None:
            delta.logprobs = logprobs(logits, token, self.top_logprobs)
        return delta


def logprobs(logits: torch.Tensor, token: int, top: int) -> dict:
    """logits: (V,) -> the chosen token's log-probability and the `top` most likely (0: none)."""
    lp = torch.log_softmax(logits, dim=-1)
    out = {"token": token, "logprob": float(lp[token])}
    if top:
        values, ids = lp.topk(top)
        out["top"] = list(zip(ids.tolist(), values.tolist()))
    return out
