"""Continuous batching: requests that join and leave a running batch produce what they produce alone."""

import time

import pytest
import torch

from nanovl.checkpoint import load_text_model
from nanovl.engine import SamplingParams, generate
from nanovl.engine.scheduler import QueueFull, Request, Scheduler
from nanovl.errors import RequestError
from nanovl.tokenizer import Tokenizer


@pytest.fixture(params=["llama", "nemotron-h"])
def model(request, tiny_llama, tmp_path_factory):
    from nanovl.tiny import write_checkpoint

    path = (
        tiny_llama
        if request.param == "llama"
        else write_checkpoint("nemotron-h", tmp_path_factory.mktemp("nh"), seed=7)
    )
    m, ckpt = load_text_model(path, dtype="float32")
    return m, Tokenizer(path, ckpt.text.eos_token_ids)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 400, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def run(sched, reqs_by_step):
    """Submit requests at given steps; step until all are done; return their outputs in order."""
    step, all_reqs = 0, []
    while True:
        for req in reqs_by_step.get(step, []):
            sched.submit(req)
            all_reqs.append(req)
        if all(r.finish_reason for r in all_reqs) and step > max(reqs_by_step):
            return all_reqs
        sched.step()
        step += 1


def request(prompt, params, sink=None):
    deltas = [] if sink is None else sink
    req = Request(prompt, params, deltas.append)
    req.deltas = deltas
    return req


def test_batched_requests_equal_each_alone(model):
    m, tk = model
    ps = prompts(10)
    params = [SamplingParams(max_new_tokens=12) if i % 2 else SamplingParams(max_new_tokens=9, temperature=0.9,
              top_p=0.9, seed=i) for i in range(10)]  # fmt: skip
    alone = [generate(m, tk, [p], sp)[0] for p, sp in zip(ps, params)]
    sched = Scheduler(m, tk, max_slots=4, max_queue=16)
    reqs = [request(p, sp) for p, sp in zip(ps, params)]
    # four at first, the rest joining while others run; more requests than slots
    done = run(sched, {0: reqs[:4], 2: reqs[4:7], 5: reqs[7:]})
    for req, want in zip(done, alone):
        assert req.output == want.token_ids
        assert "".join(d.text for d in req.deltas) == want.text
        assert req.deltas[-1].finish_reason == want.finish_reason
    assert sched.running == 0 and sorted(sched.free) == [0, 1, 2, 3]


def test_cancel_frees_the_slot_and_queue_bounds(model):
    m, tk = model
    sched = Scheduler(m, tk, max_slots=2, max_queue=2)
    long = SamplingParams(max_new_tokens=50, ignore_eos=True)
    a, b = request([5, 6, 7], long), request([8, 9], long)
    sched.submit(a)
    sched.submit(b)
    sched.step()
    assert sched.running == 2
    sched.cancel(a)
    sched.step()
    assert a.finish_reason == "cancelled" and a.deltas[-1].finish_reason == "cancelled"
    assert sched.running == 1 and len(sched.free) == 1
    sched.submit(request([1], SamplingParams()))
    sched.submit(request([2], SamplingParams()))
    with pytest.raises(QueueFull):
        sched.submit(request([3], SamplingParams()))


def test_logprobs_and_limits(model):
    m, tk = model
    sched = Scheduler(m, tk, max_slots=2, max_len=30)
    req = Request(
        [5, 6, 7], SamplingParams(max_new_tokens=100, ignore_eos=True), lambda d: deltas.append(d), top_logprobs=3
    )
    deltas = []
    run(sched, {0: [req]})
    assert req.finish_reason == "length" and len(req.prompt) + len(req.output) == 30  # the slot's capacity
    lp = deltas[0].logprobs
    assert lp["token"] == req.output[0] and len(lp["top"]) == 3 and lp["top"][0][0] == req.output[0]  # greedy
    with pytest.raises(RequestError, match="context is 30 tokens"):
        sched.submit(request(list(range(30)), SamplingParams()))


def test_timeout_and_graceful_close(model):
    import threading

    m, tk = model
    sched = Scheduler(m, tk, max_slots=2)
    slow = request([5, 6], SamplingParams(max_new_tokens=10_000, ignore_eos=True))
    slow.timeout = 0.05
    run(sched, {0: [slow]})
    assert slow.finish_reason == "timeout" and sched.running == 0
    sched.run()  # background thread; close() lets running work finish, then stops
    done = request([7, 8], SamplingParams(max_new_tokens=20, ignore_eos=True))
    sched.submit(done)
    closer = threading.Thread(target=sched.close)
    closer.start()
    closer.join(60)
    assert done.finish_reason == "length" and len(done.output) == 20
    with pytest.raises(QueueFull, match="shutting down"):
        sched.submit(request([1], SamplingParams()))


class Exploding:
    """A constraint that fails on its `at`-th use: a stand-in for any per-request failure while
    sampling (a schema the enforcer breaks on, a callback that raises, non-finite logits)."""

    def __init__(self, at: int):
        self.calls, self.at = 0, at

    def mask(self, logits, tokens):
        self.calls += 1
        if self.calls == self.at:
            raise ValueError("constraint exploded")
        return logits


def test_a_failing_request_ends_alone_and_the_engine_goes_on(tiny_llama):
    m, ckpt = load_text_model(tiny_llama, dtype="float32")
    tk = Tokenizer(tiny_llama, ckpt.text.eos_token_ids)
    sched = Scheduler(m, tk, max_slots=3)
    sched.run()
    try:
        p = SamplingParams(max_new_tokens=12, ignore_eos=True)
        bad = Request([5, 6, 7], p, lambda d: None, constraint=Exploding(at=4))
        deltas = []
        good = Request([5, 6, 7], p, deltas.append)
        raising = Request([8, 9], p, lambda d: 1 / 0)  # its callback fails on the first token
        for r in (bad, good, raising):
            sched.submit(r)
        deadline = time.time() + 30
        while any(r.finish_reason is None for r in (bad, good, raising)) and time.time() < deadline:
            time.sleep(0.01)
        assert bad.finish_reason == "error" and "constraint exploded" in bad.error and len(bad.output) == 3
        assert raising.finish_reason == "error"
        assert good.finish_reason == "length" and len(good.output) == 12
        assert good.output == generate(m, tk, [[5, 6, 7]], p)[0].token_ids
        later = sched.submit(Request([5, 6, 7], p, lambda d: None))
        while later.finish_reason is None and time.time() < deadline:
            time.sleep(0.01)
        assert later.output == good.output and sched.stats["errors"] == 2 and not sched.rows
        assert len(sched.free) == 3  # every slot came back
    finally:
        sched.close(5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the test
def test_a_dead_loop_is_reported_and_revived(tiny_llama):
    m, ckpt = load_text_model(tiny_llama, dtype="float32")
    tk = Tokenizer(tiny_llama, ckpt.text.eos_token_ids)
    sched = Scheduler(m, tk, max_slots=2)
    real_step, boom = sched.step, []

    def step():  # a BaseException escapes the loop's own boundary: the thread dies
        if not boom:
            boom.append(1)
            raise SystemExit("simulated crash")
        real_step()

    sched.step = step
    sched.run()
    try:
        first = sched.submit(Request([5, 6], SamplingParams(max_new_tokens=3), lambda d: None))
        sched.thread.join(10)
        assert sched.health() == "the engine loop is not running"
        assert sched.revive() and sched.health() is None
        assert first.finish_reason == "error" and "restarted" in first.error
        second = sched.submit(Request([5, 6], SamplingParams(max_new_tokens=3), lambda d: None))
        deadline = time.time() + 30
        while second.finish_reason is None and time.time() < deadline:
            time.sleep(0.01)
        assert second.finish_reason == "length" and sched.stats["restarts"] == 1
    finally:
        sched.close(5)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seed": 1 << 70, "temperature": 1.0}, "seed must be"),
        ({"temperature": float("inf")}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty must be"),
        ({"top_p": float("nan")}, "top_p must be"),
    ],
)
def test_values_that_would_fail_later_are_refused(fields, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**fields)


def test_sampling_stays_finite_at_extreme_values():
    from nanovl.engine.sampling import make_generator, sample

    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")], [float("inf"), 0.0, float("nan"), 1.0]])
    tiny = SamplingParams(temperature=1e-45, seed=0)  # effectively greedy, and finite
    assert sample(logits, tiny, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    big = SamplingParams(temperature=1.0, seed=(1 << 64) - 1)  # the largest seed a generator takes

    assert sample(logits, big, make_generator(big, "cpu")).shape == (2,)
    with pytest.raises(RequestError, match="no token is allowed"):
        sample(torch.full((1, 4), float("-inf")), SamplingParams(temperature=1.0), torch.Generator())
