"""Reasoning mode: <think> blocks split from answers, whole and streamed."""

import random

import pytest

from nanovl.engine import Completion
from nanovl.engine.reasoning import ReasoningStream, split_reasoning


@pytest.mark.parametrize(
    "text, reasoning, answer",
    [
        ("<think>\nadd 2 and 3\n</think>\n\nThe total is 5.", "add 2 and 3", "The total is 5."),
        ("add 2 and 3</think>5", "add 2 and 3", "5"),  # the template opened <think> in the prompt
        ("<think></think>5", "", "5"),  # /no_think: an empty block
        ("<think>still thinking", "still thinking", ""),  # cut off by max tokens
        ("Just an answer.", None, "Just an answer."),
    ],
)
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)
    c = Completion(text, [], "stop", 0)
    assert (c.reasoning, c.answer) == (reasoning, answer)


@pytest.mark.parametrize("text", ["<think>\nsum the rows: 1+2\n</think>\n\nTotal: 3", "plain answer <b>", "<thi"])
def test_stream_matches_whole_split_at_any_chunking(text):
    want_reasoning, want_answer = split_reasoning(text)
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(5, len(text) - 1)))
        parts = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        s = ReasoningStream()
        pieces = [p for part in parts for p in s.feed(part)] + s.finish()
        got_r = "".join(t for k, t in pieces if k == "reasoning")
        got_a = "".join(t for k, t in pieces if k == "answer")
        assert all("<think>" not in t and "</think>" not in t for _, t in pieces)
        assert got_a.strip() == want_answer.strip()
        assert (got_r.strip() if want_reasoning is not None else None) == (
            want_reasoning if want_reasoning is None else want_reasoning.strip()
        )


def test_think_switch_reaches_the_prompt(tiny_v2):
    import nanovl

    m = nanovl.load(tiny_v2, dtype="float32")
    from PIL import Image

    page = Image.new("RGB", (300, 200), "white")
    off = m.prepare(m.load_images(page), "Q", system=nanovl.api.reasoning_system(None, False))
    on = m.prepare(m.load_images(page), "Q", system=nanovl.api.reasoning_system("Be brief.", True))
    assert m.tokenizer.decode(off.ids).endswith("<think></think>")  # the template closes it for /no_think
    assert "System\n/think\nBe brief.\n" in m.tokenizer.decode(on.ids)
    c = m.ask(page, "Q", think=True, max_new_tokens=4)
    from nanovl.engine import SamplingParams, generate

    want = generate(
        m.model,
        m.tokenizer,
        [on.ids[:0] + m.prepare(m.load_images(page), "Q", system="/think").ids],
        SamplingParams(max_new_tokens=4),
        embeds=[m.prepare(m.load_images(page), "Q", system="/think").embeds],
    )
    assert c.token_ids == want[0].token_ids  # think=True is exactly the /think system prompt
