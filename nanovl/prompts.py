"""Image and video placeholders in prompts.

A question about k images and videos carries one placeholder per item, `<image>` or `<video>`: the
caller's own, or, as the HF chat() of these models does, one line per item before the question.
After the chat template has rendered, each placeholder is replaced, in order, by that item's token
text (the family's tags and context tokens), and the whole text is tokenised once, so tags that are
plain text tokenise exactly as they would in the reference processors.

A video is a sequence of one-tile frames, each introduced as in the 12B V2 processor:
"Frame k sampled at t.tt seconds: " (or "Frame k: " when the time is unknown), one per line.
"""

from __future__ import annotations

import re

from nanovl.errors import RequestError

PLACEHOLDERS = {"image": "<image>", "video": "<video>"}
_SPLIT = re.compile("(" + "|".join(map(re.escape, PLACEHOLDERS.values())) + ")")


def media_question(question: str, kinds: list[str]) -> str:
    """The user turn: the question as given if it places its media, else one line per item first."""
    if _SPLIT.search(question):
        return question
    return "".join(f"{PLACEHOLDERS[k]}\n" for k in kinds) + question


def expand_media(text: str, items: list[tuple[str, str]]) -> str:
    """Replace the placeholders of `text`, in order, by the items' token text; items: (kind, text)."""
    parts = _SPLIT.split(text)
    found = parts[1::2]
    wanted = [PLACEHOLDERS[kind] for kind, _ in items]
    if found != wanted:
        raise RequestError(
            f"the prompt's placeholders {found or 'none'} do not match the inputs {wanted} "
            "(one per image or video, in order)"
        )
    out = [parts[0]]
    for (_, item_text), rest in zip(items, parts[2::2]):
        out += [item_text, rest]
    return "".join(out)


def video_text(frame_text: str, timestamps: list[float] | None, n: int) -> str:
    """The token text of an n-frame video; frame_text is one frame's image text."""
    lines = []
    for k in range(n):
        when = f" sampled at {timestamps[k]:.2f} seconds" if timestamps else ""
        lines.append(f"Frame {k + 1}{when}: {frame_text}")
    return "\n".join(lines)
