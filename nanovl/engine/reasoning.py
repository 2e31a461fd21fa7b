"""Reasoning mode: `<think>...</think>` separated from the answer, whole or while streaming.

Reasoning models (Nemotron-Nano-VL-12B-V2) think when the system prompt says `/think` and answer
directly with `/no_think`; the thought comes first, between `<think>` and `</think>`. The chat
template may already open the `<think>` block in the prompt, so text before a lone `</think>` is
reasoning too.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, answer)."""
    if CLOSE in text:
        thought, _, answer = text.partition(CLOSE)
        return thought.replace(OPEN, "", 1).strip(), answer.lstrip()
    if text.lstrip().startswith(OPEN):  # cut off while still thinking
        return text.lstrip()[len(OPEN) :].strip(), ""
    return None, text


class ReasoningStream:
    """Text deltas in, ("reasoning" | "answer", text) pieces out. A tag split across deltas is held
    back until it is complete, so no piece carries half a tag."""

    def __init__(self, thinking_at_start: bool = False):
        self.kind = "reasoning" if thinking_at_start else "answer"
        self.started = thinking_at_start  # an answer-mode stream may still open a think block first
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out = []
        while True:
            if self.kind == "answer" and not self.started:
                head = self.buf.lstrip()
                if head.startswith(OPEN):
                    self.buf, self.kind, self.started = head[len(OPEN) :], "reasoning", True
                    continue
                if OPEN.startswith(head) and head:  # could still become "<think>"
                    return out
                self.started = True
            if self.kind == "reasoning" and CLOSE in self.buf:
                thought, _, self.buf = self.buf.partition(CLOSE)
                if thought:
                    out.append(("reasoning", thought))
                self.kind, self.buf = "answer", self.buf.lstrip("\n")
                continue
            break
        keep = _partial_tag(self.buf, CLOSE) if self.kind == "reasoning" else 0
        emit, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        if emit:
            out.append((self.kind, emit))
        return out

    def finish(self) -> list[tuple[str, str]]:
        rest, self.buf = self.buf, ""
        return [(self.kind, rest)] if rest else []


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
