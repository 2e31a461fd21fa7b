"""Engine contracts: cached decode == full forward, seeds, stop strings, streaming, sampling rules."""

import pytest
import torch

import nanovl
from nanovl.checkpoint import load_text_model
from nanovl.engine import SamplingParams, TokenGenerator, generate, stream
from nanovl.engine.sampling import apply_repetition_penalty, sample
from nanovl.errors import RequestError


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return nanovl.load(tiny_llama, dtype="float32")


def full_forward_last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


@pytest.mark.parametrize("lengths", [[13], [5, 17, 11]], ids=["batch1", "padded3"])
def test_cached_decode_equals_full_forward(tiny_ckpt, lengths):
    model, _ = load_text_model(tiny_ckpt, dtype="float32")
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    gen = TokenGenerator(model, prompts, SamplingParams(max_new_tokens=12))
    steps = []
    for tokens in gen:
        steps.append((tokens, gen.logits.clone()))
    assert len(steps) == 12
    for row, prompt in enumerate(prompts):
        out = gen.output_ids[row]
        assert len(out) == 12
        for t, (tokens, logits) in enumerate(steps):
            want = full_forward_last_logits(model, prompt + out[:t])
            assert (logits[row] - want).abs().max().item() < 1e-4, (row, t)
            assert tokens[row] == out[t] == int(want.argmax())


def test_padded_batch_equals_each_prompt_alone(llama):
    prompts = ["Receipt total", "The quarterly revenue chart shows", "Hi"]
    batch = llama.generate_batch(prompts, max_new_tokens=10)
    for p, c in zip(prompts, batch):
        alone = llama.generate(p, max_new_tokens=10)
        assert c.token_ids == alone.token_ids and c.text == alone.text


def test_same_seed_same_text(llama):
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    a, b = llama.generate("Invoice", **kw), llama.generate("Invoice", **kw)
    c = llama.generate("Invoice", **{**kw, "seed": 99})
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids  # 24 tokens sampled at T=1 from ~500: a collision would be a bug


def test_stop_strings_cut_exactly(llama):
    base = llama.generate("Name:", max_new_tokens=40)
    text = base.text
    assert len(text) > 10
    # take a stop string from the middle of the greedy output; output must end right before it
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = llama.generate("Name:", max_new_tokens=40, stop=[stop, "never-appears-xyz"])
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(base.token_ids)


def test_stream_deltas_concatenate_to_final_text(llama):
    ids = llama.tokenizer.encode("東京 café")
    for params in [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30, temperature=1.2, seed=5)]:
        deltas = list(stream(llama.model, llama.tokenizer, [ids], params))
        out_ids = [d.token_id for d in deltas]
        assert "".join(d.text for d in deltas) == llama.tokenizer.decode(out_ids, skip_special_tokens=True)
        assert deltas[-1].finish_reason in ("length", "stop")
        assert all(d.finish_reason is None for d in deltas[:-1])
        for d in deltas:  # a multi-byte character is never split into a replacement char mid-stream
            assert d.text.encode("utf-8").decode("utf-8") == d.text


def test_eos_stops_and_is_not_in_text(llama):
    greedy = llama.generate("Hi", max_new_tokens=8)
    eos = greedy.token_ids[3]  # declare the 4th greedy token an end-of-sequence id
    c = llama.generate("Hi", max_new_tokens=8, stop_token_ids=[eos])
    assert c.token_ids == greedy.token_ids[:4] and c.finish_reason == "stop"


def test_context_full_ends_with_length(tiny_llama):
    model = nanovl.load(tiny_llama, dtype="float32")
    ids = model.tokenizer.encode("a b c d e f")
    c = generate(model.model, model.tokenizer, [ids], SamplingParams(max_new_tokens=100), context_len=len(ids) + 5)
    assert len(c[0].token_ids) == 5 and c[0].finish_reason == "length"


def test_prompt_longer_than_context_is_an_error(llama):
    ids = [5] * 600  # the tiny model's context is 512
    with pytest.raises(RequestError, match="600 tokens.*512"):
        llama.generate(ids, max_new_tokens=1)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_values(kw, msg):
    with pytest.raises(RequestError, match=msg):
        SamplingParams(**kw)


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    g = torch.Generator().manual_seed(0)
    draws = lambda p: {int(sample(logits, p, g)) for _ in range(300)}  # noqa: E731
    assert draws(SamplingParams(temperature=1.0, top_k=1)) == {0}
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    # probs ~ [.61, .22, .14, .03, .004]: top_p 0.7 keeps the first two (0.61 < 0.7)
    assert draws(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    # min_p 0.3 keeps tokens with p >= 0.3 * 0.61 = 0.18
    assert draws(SamplingParams(temperature=1.0, min_p=0.3)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0)) >= {0, 1, 2}
    seen = torch.tensor([[True, False, False, True, False]])
    pen = apply_repetition_penalty(logits, seen, 2.0)
    assert pen.tolist() == [[1.0, 1.0, 0.5, -2.0, -3.0]]


def test_packed_bf16_linears_match_plain(tiny_llama):
    from nanovl.quant.prepack import PackedLinear, packing_supported

    if not packing_supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU has no oneDNN bf16 support")
    plain, _ = load_text_model(tiny_llama, dtype="bfloat16")
    packed, _ = load_text_model(tiny_llama, dtype="bfloat16", pack=True)
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(packed.model.layers[0].mlp.up_proj, PackedLinear)
    ids = torch.randint(0, plain.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(ids).float(), packed(ids).float()
    assert (a - b).abs().max().item() <= 1e-2 * a.abs().max().item()
    prompt = ids[0, :10].tolist()
    greedy = lambda m: [t[0] for t in TokenGenerator(m, [prompt], SamplingParams(max_new_tokens=16))]  # noqa: E731
    assert greedy(plain) == greedy(packed)
