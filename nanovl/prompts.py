"""Image placeholders in prompts.

A question about k images carries k `<image>` placeholders: the caller's own, or, as the HF chat()
of these models does, one "<image>\\n" per image before the question. After the chat template has
rendered, each placeholder is replaced, in order, by that image's token text (the family's tags and
context tokens), and the whole text is tokenised once, so tags that are plain text tokenise exactly as
they would in the reference processors.
"""

from __future__ import annotations

from nanovl.errors import RequestError

PLACEHOLDER = "<image>"


def image_question(question: str, n_images: int) -> str:
    """The user turn: the question as given if it places its images, else one line per image first."""
    if PLACEHOLDER in question:
        return question
    return f"{PLACEHOLDER}\n" * n_images + question


def expand_images(text: str, image_texts: list[str]) -> str:
    """Replace the placeholders of `text`, in order, by `image_texts` (one per image)."""
    parts = text.split(PLACEHOLDER)
    if len(parts) - 1 != len(image_texts):
        raise RequestError(f"the prompt has {len(parts) - 1} {PLACEHOLDER} placeholders for {len(image_texts)} images")
    return parts[0] + "".join(img + rest for img, rest in zip(image_texts, parts[1:]))
