"""Training: overfitting, freezing, LoRA merge, packing, resumption after SIGTERM / SIGKILL, torchrun,
tar shards, and the errors bad data and bad configs get."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanovl.errors import DataError
from nanovl.synth import write_dataset
from nanovl.tiny import write_checkpoint
from nanovl.train.config import load_train_config
from nanovl.train.data import Encoder, Skips, collate, read_records, write_shards
from nanovl.train.trainer import TrainModel, build_model, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_checkpoint("nemotron-nano-vl-v1", root / "base", image_size=64, size={"max_position_embeddings": 2048})
    write_dataset(root / "data", 2, ["invoice", "receipt", "form", "table"], text_count=8, augment=0.5)
    # eight one-question conversations, document k asked its k-th question (the random vision tower
    # barely tells two documents of a kind apart, so the questions differ)
    qa = [json.loads(x) for x in (root / "data" / "qa.jsonl").read_text().splitlines()]
    small = []
    for k, r in enumerate(qa):
        j = k % (len(r["messages"]) // 2)
        q, a = r["messages"][2 * j], r["messages"][2 * j + 1]
        small.append({**r, "messages": [{**q, "content": "<image>\n" + q["content"].removeprefix("<image>\n")}, a]})
    (root / "data" / "qa8.jsonl").write_text("".join(json.dumps(r) + "\n" for r in small))
    return root


def config(work: Path, name: str, **fields) -> Path:
    cfg = {"stage": "sft", "model": str(work / "base"), "out": str(work / name),
           "data": [str(work / "data/qa8.jsonl")], "steps": 8, "batch_size": 4, "grad_accum": 2,
           "lr": 3e-3, "max_tiles": 1, "threads": 1, **fields}  # fmt: skip
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def overfit(work):
    """Trained once per worker process: the tests that load the result may run on another worker than
    the one that checks the curve."""
    cfg = load_train_config(config(work, "overfit", steps=120, batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=5,
                                   min_lr_ratio=0.05, save_every=1000))  # fmt: skip
    return train(cfg)


def test_overfits_eight_samples(work, overfit):
    summary = overfit
    curve = losses(work / "overfit")
    assert curve[0] > 3.0 and summary["loss"] < 0.05, (curve[0], summary["loss"])
    assert (work / "overfit" / "model" / "model.safetensors").is_file()


def test_trained_model_answers_through_the_api(work, overfit):
    import nanovl

    m = nanovl.load(work / "overfit" / "model")
    rec = json.loads((work / "data" / "qa8.jsonl").read_text().splitlines()[0])
    question = rec["messages"][0]["content"].split("\n", 1)[1]
    got = m.ask(work / "data" / rec["images"][0], question, max_tiles=1, max_new_tokens=24).text
    assert got == rec["messages"][1]["content"]


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def with_trained_weights(base: Path, out: Path):
    """The base model with the trainable weights of OUT's last checkpoint copied in: the model a run
    ended with, built without the export, so what the exported OUT/model answers can be checked."""
    import nanovl

    m = nanovl.load(base)
    vlm = getattr(m, "vlm", None)
    params = dict((vlm if vlm is not None else m.model).named_parameters())
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    for name, t in load_file(latest / "trainable.safetensors").items():
        owner, rest = name.split(".", 1)  # TrainModel's children: lm (the language model) and vlm
        params["language_model." + rest if owner == "lm" and vlm is not None else rest].data.copy_(t)
    return m


def test_stage_freezing_is_real(work):
    base = weights(work / "base")
    train(load_train_config(config(work, "proj", stage="projector", steps=3)))
    after = weights(work / "proj" / "model")
    assert set(after) == set(base) - {"vision_model.radio_model.summary_idxs"}  # unused by the model
    changed = {k for k in after if not torch.equal(base[k], after[k])}
    assert changed and all(k.startswith("mlp1.") for k in changed)
    assert {k for k in base if k.startswith("mlp1.") and k.endswith("weight")} <= changed

    train(load_train_config(config(work, "sft", steps=3)))
    after = weights(work / "sft" / "model")
    changed = {k for k in after if not torch.equal(base[k], after[k])}
    assert not any(k.startswith("vision_model.") for k in changed)
    assert any(k.startswith("language_model.model.layers.") for k in changed)


def test_lora_merge_equals_adapter_inference(work, tmp_path):
    from nanovl.checkpoint import load_vlm
    from nanovl.train.export import merge_checkpoint
    from nanovl.train.lora import load_adapter

    cfg = config(work, "lora", steps=4, lora={"rank": 4, "alpha": 8, "projector": True})
    train(load_train_config(cfg))
    adapter = work / "lora" / "adapter"
    state = load_file(adapter / "adapter_model.safetensors")
    assert any(".mlp1." in k for k in state) and any("self_attn.q_proj.lora_B" in k for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it learned something
    merged_dir = merge_checkpoint(adapter, tmp_path / "merged")

    with_adapter, _ = load_vlm(work / "base", dtype="float32")
    load_adapter(with_adapter, adapter)
    merged, _ = load_vlm(merged_dir, dtype="float32")
    plain, _ = load_vlm(work / "base", dtype="float32")
    pixels = torch.rand(2, 3, 64, 64)
    ids = torch.randint(0, 400, (1, 12))
    outs = []
    for m in (with_adapter, merged, plain):
        with torch.no_grad():
            outs.append((m.encode_images(pixels), m.language_model(ids)))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5) and torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
    assert not torch.allclose(outs[0][1], outs[2][1], atol=1e-3)  # the adapter does change the model


def test_packed_batch_equals_separate_samples(work):
    cfg = load_train_config(config(work, "pack"))
    model, tok, encoder, tiles, _ = build_model(cfg)
    records = read_records(cfg.data)[:4] + read_records([work / "data" / "text.jsonl"])[:4]  # short ones fit beside
    examples = [encoder.encode(r) for r in records]
    model.eval()
    with torch.no_grad():
        packed = collate(examples, tiles, 2048, True, 0)
        assert packed.ids.shape[0] < len(examples) and packed.mask is not None  # some rows hold two samples
        whole = model(packed.ids, packed.targets, packed.positions, packed.mask, packed.pixels)
        alone = 0.0
        for e in examples:
            b = collate([e], tiles, 2048, True, 0)
            alone += model(b.ids, b.targets, b.positions, b.mask, b.pixels)
    assert torch.allclose(whole, alone, rtol=1e-5)


def test_assistant_tokens_only(work):
    cfg = load_train_config(config(work, "labels"))
    _, tok, encoder, _, _ = build_model(cfg)
    rec = read_records(cfg.data)[0]
    e = encoder.encode(rec)
    trained = [e.ids[i + 1] for i, t in enumerate(e.targets) if t != -100]
    assert tok.decode(trained) == rec.messages[1]["content"] + "<|eot_id|>"


def run_cli(cfg: Path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanovl.cli", "train", "--config", str(cfg), *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("training made no progress")


def test_resume_after_sigterm_and_sigkill(work):
    fields = {"steps": 24, "save_every": 4, "batch_size": 2, "grad_accum": 1}
    ref = run_cli(config(work, "ref", **fields))
    assert ref.wait() == 0, ref.communicate()
    want = losses(work / "ref")
    assert len(want) == 24

    term = config(work, "term", **fields)
    p = run_cli(term)
    wait_for_step(work / "term", 6, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 143, p.communicate()
    stopped = len(losses(work / "term"))
    assert stopped < 24 and (work / "term" / "checkpoints" / f"step-{stopped:08d}").is_dir()
    p = run_cli(term)
    assert p.wait() == 0, p.communicate()
    assert losses(work / "term") == want  # the same losses, step for step

    kill = config(work, "kill", **fields)
    p = run_cli(kill)
    wait_for_step(work / "kill", 10, p)
    p.kill()
    p.wait()
    killed_at = len(losses(work / "kill"))
    latest = (work / "kill" / "checkpoints" / "latest").read_text()
    resume = int(latest.split("-")[1])
    assert killed_at - resume <= 4  # at most one checkpoint interval lost
    p = run_cli(kill)
    assert p.wait() == 0, p.communicate()
    assert losses(work / "kill") == want


def test_torchrun_two_processes_match_one_with_double_accumulation(work):
    one = config(work, "one", steps=4, batch_size=2, grad_accum=2)
    two = config(work, "two", steps=4, batch_size=2, grad_accum=1)
    p = run_cli(one)
    assert p.wait() == 0, p.communicate()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nanovl.cli",
           "train", "--config", str(two)]  # fmt: skip
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(work / "one"), losses(work / "two")
    assert len(a) == len(b) == 4
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert a == pytest.approx(b, rel=2e-3)  # bf16 autocast: summation order differs between the runs
    wa, wb = weights(work / "one" / "model"), weights(work / "two" / "model")
    assert all(torch.allclose(wa[k], wb[k], atol=2e-3) for k in wa)


def test_tar_shards_give_the_same_samples(work, tmp_path):
    shards = write_shards(work / "data" / "qa8.jsonl", tmp_path / "shards", per_shard=3)
    assert len(shards) == 3
    cfg = load_train_config(config(work, "shards"))
    _, _, encoder, spec, _ = build_model(cfg)
    a = [encoder.encode(r) for r in read_records(cfg.data)]
    b = [encoder.encode(r) for r in read_records([tmp_path / "shards"])]
    assert [e.ids for e in a] == [e.ids for e in b] and [e.targets for e in a] == [e.targets for e in b]
    assert torch.equal(collate(a, spec, 2048, True, 0).pixels, collate(b, spec, 2048, True, 0).pixels)


def bad_file(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(x + "\n" for x in lines))
    return p


GOOD = json.dumps(
    {"images": [], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
)


@pytest.mark.parametrize(
    "line, message",
    [
        ("", "bad.jsonl:2: empty line"),
        ("{not json", "bad.jsonl:2: not valid JSON"),
        (json.dumps({"images": ["missing.png"], "messages": [{"role": "user", "content": "<image>"},
                                                              {"role": "assistant", "content": "x"}]}),
         "bad.jsonl:2: image .*missing.png not found"),
        (json.dumps({"messages": [{"role": "user", "content": "<image> q"}, {"role": "assistant", "content": "a"}]}),
         "bad.jsonl:2: 1 <image> placeholder"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "bad.jsonl:2: no assistant message"),
        (json.dumps({"messages": [{"role": "robot", "content": "q"}]}), "bad.jsonl:2: each message needs a role"),
        (json.dumps({**json.loads(GOOD), "meta": {"split": "eval"}}), "bad.jsonl:2: an evaluation record"),
    ],
)  # fmt: skip
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = bad_file(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError, match=message):
        read_records([path])
    skips = Skips()
    assert len(read_records([path], skip_bad=True, skips=skips)) == 2 and skips.total == 1


def test_too_long_sample_and_bad_configs(work, tmp_path):
    cfg = config(work, "long", seq_len=20)
    with pytest.raises(DataError, match=r"qa8.jsonl:1: \d+ tokens, over seq_len 20"):
        train(load_train_config(cfg))
    cfg = load_train_config(config(work, "long2", seq_len=20, skip_bad=True))
    with pytest.raises(DataError, match="0 usable samples"):
        train(cfg)
    for fields, message in [({"stage": "finetune"}, r"\.json:1: field 'stage' must be one of"),
                            ({"lr_max": 1}, r"\.json:1: unknown field 'lr_max'"),
                            ({"lora": {"rank": 2, "targets": ["qkv"]}}, "unknown projections")]:  # fmt: skip
        with pytest.raises(DataError, match=message):
            load_train_config(config(work, "badcfg", **fields))
    toml = tmp_path / "stage.toml"
    toml.write_text('stage = "sft"\nmodel = "m"\nout = "o"\ndata = ["d.jsonl"]\nsteps = 2\n\nwarmup = 3\n')
    with pytest.raises(DataError, match=r"stage.toml:7: unknown field 'warmup'"):
        load_train_config(toml)


def test_resume_refuses_a_different_run(work):
    cfg = config(work, "guard", steps=2)
    train(load_train_config(cfg))
    changed = config(work, "guard", steps=4, lr=1e-4)
    with pytest.raises(DataError, match="another lr"):
        train(load_train_config(changed))
    summary = train(load_train_config(changed), restart=True)
    assert summary["steps"] == 4 and len(losses(work / "guard")) == 4


def test_rerunning_a_finished_run_reports_its_last_loss(work, capsys):
    from nanovl.cli import main

    cfg = config(work, "finished", steps=2)
    assert main(["train", "--config", str(cfg)]) == 0
    first = capsys.readouterr().out
    assert main(["train", "--config", str(cfg)]) == 0
    again = capsys.readouterr().out
    loss = f"final loss {losses(work / 'finished')[-1]:.4f}"
    assert loss in first and "already finished (2 steps, " + loss in again and "loss nan" not in again, again


def test_train_module_rejects_mismatched_image_tokens(work):
    cfg = load_train_config(config(work, "mismatch"))
    model, _, encoder, tiles, _ = build_model(cfg)
    e = encoder.encode(read_records(cfg.data)[0])
    b = collate([e], tiles, 2048, True, 0)
    with pytest.raises(ValueError, match="image context tokens for"):
        TrainModel.forward(model, b.ids, b.targets, b.positions, b.mask, torch.cat([b.pixels, b.pixels]))


def test_encoder_needs_a_turn_by_turn_template(work):
    class Odd:
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return "".join(m["content"] for m in reversed(messages))

    rec = read_records([work / "data" / "qa8.jsonl"])[0]
    with pytest.raises(DataError, match="turn by turn"):
        Encoder(Odd()).segments(rec.messages + [{"role": "user", "content": "again"}, rec.messages[1]], "x")


def test_synth_cli_writes_jsonl_and_shards(tmp_path, capsys):
    from nanovl.cli import main

    assert (
        main(["synth", str(tmp_path), "--count", "1", "--kinds", "form,report", "--text", "3", "--shard-size", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "qa.jsonl: 2 records" in out and "text.jsonl: 3 records" in out
    shards = sorted((tmp_path / "shards" / "qa").glob("*.tar"))
    assert len(shards) == 1 and len(read_records(shards)) == 2
    assert main(["synth", str(tmp_path), "--kinds", "poster"]) == 1
    assert "unknown document kind(s) poster" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["nvlm-d", "nemotron-nano-vl-v2"])
def test_other_families_train_and_reload(work, tmp_path, family):
    base = write_checkpoint(family, tmp_path / "base", image_size=56 if family == "nvlm-d" else 64,
                            vision={"image_size": 56} if family == "nvlm-d" else None)  # fmt: skip
    cfg = config(work, f"fam-{family}", model=str(base), out=str(tmp_path / "out"), steps=3, lr=1e-2)
    summary = train(load_train_config(cfg))
    curve = losses(tmp_path / "out")
    assert len(curve) == 3 and curve[-1] < curve[0], curve
    import nanovl

    rec = read_records([work / "data" / "qa8.jsonl"])[0]
    got, want = (m.ask(rec.images[0], "What is the total?", max_tiles=1, max_new_tokens=3)
                 for m in (nanovl.load(summary["saved"]), with_trained_weights(base, tmp_path / "out")))  # fmt: skip
    assert (got.text, got.token_ids) == (want.text, want.token_ids) and len(got.token_ids) > 0


def test_training_reads_the_image(work, tmp_path):
    """Answers only the pixels carry (the colour of a box at a random place): a held-out accuracy well
    above chance shows the image path trains end to end (the overfit test could pass on text alone)."""
    import random

    from PIL import Image, ImageDraw

    import nanovl

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "black": (0, 0, 0)}
    rng, recs = random.Random(0), []
    for i in range(64):
        name = rng.choice(list(colours))
        im = Image.new("RGB", (96, 64), "white")
        x, y = rng.randint(0, 50), rng.randint(0, 24)
        ImageDraw.Draw(im).rectangle([x, y, x + 40, y + 36], fill=colours[name])
        im.save(tmp_path / f"{i}.png")
        q = "<image>\nWhat colour is the box?"
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": name}]
        recs.append({"images": [f"{i}.png"], "messages": turns})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:48]))
    cfg = config(work, "colours", data=[str(tmp_path / "train.jsonl")], out=str(tmp_path / "out"), steps=60,
                 batch_size=8, grad_accum=1, lr=1e-3, warmup_steps=5, train_vision=True)  # fmt: skip
    m = nanovl.load(train(load_train_config(cfg))["saved"])
    right = sum(m.ask(tmp_path / r["images"][0], "What colour is the box?", max_tiles=1, max_new_tokens=3).text
                == r["messages"][1]["content"] for r in recs[48:])  # fmt: skip
    assert right >= 10, right  # of 16; chance is 4


def test_per_sample_tile_budget(work):
    from nanovl.tokenizer import Tokenizer
    from nanovl.train.data import Record

    cfg = load_train_config(config(work, "budget", max_tiles=4))
    _, tok, encoder, spec, _ = build_model(cfg)
    page = next((work / "data" / "images").glob("invoice-*.png"))
    rec = Record("x.jsonl:1", [{"role": "user", "content": "<image><image><image>"},
                               {"role": "assistant", "content": "ok"}], [page] * 3)  # fmt: skip
    assert sum(p.tiles for p in Encoder(tok, spec, None, 4).plans(rec)) > 6
    tight = Encoder(tok, spec, None, 4, sample_tiles=6)
    assert sum(p.tiles for p in tight.plans(rec)) <= 6
    with pytest.raises(DataError, match="x.jsonl:1: 3 images need 3 tiles at the least, over sample_tiles 2"):
        Encoder(Tokenizer(work / "base"), spec, None, 4, sample_tiles=2).plans(rec)


def test_text_model_trains_on_text_only_data(work, tmp_path):
    import nanovl

    base = write_checkpoint("llama", tmp_path / "base")
    cfg = config(work, "textonly", model=str(base), out=str(tmp_path / "out"), data=[str(work / "data/text.jsonl")],
                 steps=4, batch_size=4, grad_accum=1, lr=1e-2)  # fmt: skip
    summary = train(load_train_config(cfg))
    curve = losses(tmp_path / "out")
    assert curve[-1] < curve[0]
    got, want = (m.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
                 for m in (nanovl.load(summary["saved"]), with_trained_weights(base, tmp_path / "out")))  # fmt: skip
    assert (got.text, got.token_ids) == (want.text, want.token_ids) and len(got.token_ids) > 0
    with pytest.raises(DataError, match="stage projector needs a vision-language checkpoint"):
        train(load_train_config(config(work, "textproj", model=str(base), stage="projector")))


def test_the_lr_stays_flat_until_the_decay_fraction():
    from nanovl.train.config import TrainConfig
    from nanovl.train.loop import lr_at

    def cfg(**kw):
        return TrainConfig(stage="sft", model="m", out="o", data=["d"], steps=1000, lr=1.0, warmup_steps=100,
                           min_lr_ratio=0.1, **kw)  # fmt: skip

    cosine, flat = cfg(), cfg(decay_fraction=0.15)  # the decay spans the last 135 of 900 steps
    assert lr_at(49, cosine) == lr_at(49, flat) == 0.5  # the same warm-up
    assert lr_at(100, cosine) == 1.0 and abs(lr_at(500, cosine) - 0.628) < 0.01  # a cosine over all 900
    assert lr_at(500, flat) == lr_at(865, flat) == 1.0  # flat until 1000 - 135
    assert 0.1 < lr_at(932, flat) < 1.0 and abs(lr_at(932, flat) - 0.55) < 0.01  # half-way down
    assert abs(lr_at(999, flat) - 0.1) < 1e-3 and abs(lr_at(999, cosine) - 0.1) < 1e-3
