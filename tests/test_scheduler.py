"""Continuous batching: requests that join and leave a running batch produce what they produce alone."""

import pytest
import torch

from nanovl.api import load_text_model
from nanovl.engine import SamplingParams, generate
from nanovl.engine.scheduler import QueueFull, Request, Scheduler
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
    with pytest.raises(Exception, match="context is 30 tokens"):
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
