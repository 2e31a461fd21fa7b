"""Engine semantics on a mock model (no weights): both decode loops go through the same per-token step,
so the single-stream generator and the batch scheduler give the same deltas for the same requests."""

from dataclasses import dataclass

import pytest
import torch

from nanovl.engine import SamplingParams, TokenStep, generate
from nanovl.engine.scheduler import Request, Scheduler
from nanovl.models.cache import KVCache, SlotCache
from nanovl.tokenizer import Tokenizer


@dataclass
class MockConfig:
    vocab_size: int
    max_position_embeddings: int = 64
    hidden_size: int = 4
    num_hidden_layers: int = 1
    num_key_value_heads: int = 1
    head_dim: int = 2
    pattern: str = "*"


class CountingModel:
    """Next-token logits favour (last token + 1) mod V, then (last + 2): a deterministic walk through
    the vocabulary whose second choice the repetition penalty and the sampler can reach."""

    recurrent = False
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, vocab: int):
        self.config = MockConfig(vocab)

    def make_cache(self, batch, max_len):
        return KVCache.for_model(self.config, batch, max_len, self.dtype)

    def make_slot_cache(self, slots, max_len):
        return SlotCache(self.config, slots, max_len, self.dtype)

    def embed(self, tokens):
        return torch.zeros(*tokens.shape, self.config.hidden_size)

    def __call__(self, tokens, positions, cache, mask=None, embeds=None, last_only=False, valid=None,
                 last_index=None):  # fmt: skip
        V = self.config.vocab_size
        logits = torch.full((*tokens.shape, V), -5.0)
        nxt = (tokens + 1) % V
        logits.scatter_(-1, nxt[..., None], 5.0)
        logits.scatter_(-1, ((tokens + 2) % V)[..., None], 4.0)
        cache.advance(tokens.shape[1])
        if last_index is not None:  # a right-padded batch: each row's last real token
            logits = logits[torch.arange(len(tokens)), last_index][:, None]
        return logits[:, -1:] if last_only else logits


@pytest.fixture(scope="module")
def parts(tiny_llama):
    from nanovl.checkpoint import load_config

    tok = Tokenizer(tiny_llama, load_config(tiny_llama).text.eos_token_ids)
    return CountingModel(tok.tk.get_vocab_size()), tok


def scheduled(model, tok, prompts, params):
    sched = Scheduler(model, tok, max_slots=len(prompts), max_len=model.config.max_position_embeddings)
    out = [[] for _ in prompts]
    reqs = [sched.submit(Request(p, params, out[i].append)) for i, p in enumerate(prompts)]
    while any(r.finish_reason is None for r in reqs):
        sched.step()
    return [("".join(d.text for d in ds), [d.token_id for d in ds], ds[-1].finish_reason) for ds in out]


CASES = [
    SamplingParams(max_new_tokens=5),
    SamplingParams(max_new_tokens=40),
    SamplingParams(max_new_tokens=8, repetition_penalty=3.0),
    SamplingParams(max_new_tokens=8, temperature=1.5, top_k=2, seed=3),
    SamplingParams(max_new_tokens=12, stop_token_ids=[120]),
]


@pytest.mark.parametrize("params", CASES, ids=["length", "long", "penalty", "seeded", "stop-id"])
def test_both_loops_take_the_same_steps(parts, params):
    model, tok = parts
    prompts = [[100, 101, 102], [110] * 20, [117]]
    want = scheduled(model, tok, prompts, params)
    got = [(c.text, c.token_ids, c.finish_reason) for c in generate(model, tok, prompts, params)]
    assert got == want
    if params.max_new_tokens == 5:
        assert want[0][1] == [103, 104, 105, 106, 107] and want[0][2] == "length"


def test_finish_rules_and_stop_strings(parts):
    model, tok = parts
    p = [100]
    walk = [101 + i for i in range(8)]
    text = tok.decode(walk)
    assert len(text) > 4
    stop = text[2:4]  # a stop string inside the walk's text: cut exactly there, finish "stop"
    (c,) = generate(model, tok, [p], SamplingParams(max_new_tokens=8, stop=[stop]))
    assert c.finish_reason == "stop" and c.text == text[: text.index(stop)]
    (c,) = generate(model, tok, [p], SamplingParams(max_new_tokens=8, stop_token_ids=[104]))
    assert c.token_ids == [101, 102, 103, 104] and c.finish_reason == "stop"
    (c,) = generate(model, tok, [[60]], SamplingParams(max_new_tokens=100))  # the context: 64 - 1 prompt token
    assert len(c.token_ids) == 63 and c.finish_reason == "length"


def test_the_step_penalises_what_it_has_seen(parts):
    model, tok = parts
    V = model.config.vocab_size
    logits = torch.full((V,), -5.0)
    logits[7], logits[8] = 5.0, 4.0
    plain = TokenStep([1], SamplingParams(max_new_tokens=4), [], room=10)
    assert plain(logits).token_id == 7 and plain(logits).token_id == 7
    step = TokenStep([7], SamplingParams(max_new_tokens=4, repetition_penalty=3.0), [], room=10)
    d = step(logits)  # 7 is in the prompt: 5 / 3 < 4, so 8 wins; then both are seen
    assert d.token_id == 8 and d.finish_reason is None and step.output == [8]
    assert step(logits).token_id == 7  # 5 / 3 > 4 / 3
    assert TokenStep([1], SamplingParams(max_new_tokens=9), [7], room=1)(logits).finish_reason == "stop"
    assert TokenStep([1], SamplingParams(max_new_tokens=9), [], room=1)(logits).finish_reason == "length"
