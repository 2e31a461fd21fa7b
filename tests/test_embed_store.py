"""The vision-embedding store: what it serves from disk is what was put, or it is recomputed."""

import torch
from PIL import Image
from safetensors.torch import save_file

import nanovl
from nanovl.engine.embed_store import EmbedStore


def entry(store: EmbedStore, key: str):
    return store._path(key)


def test_altered_entries_are_dropped_not_served(tmp_path):
    value = torch.randn(2, 4, 8)
    cases = {
        "same-size byte flip": lambda p: p.write_bytes(p.read_bytes()[:-8] + bytes(8)),
        "another dtype": lambda p: save_file({"embeds": value.to(torch.bfloat16)}, p),
        "another shape": lambda p: save_file({"embeds": value.reshape(4, 2, 8)}, p),
        "NaN inside, digest of the NaNs": None,
        "not safetensors": lambda p: p.write_bytes(b"garbage"),
    }
    for i, (name, alter) in enumerate(cases.items()):
        key = f"{i:02d}" + "ab" * 19
        EmbedStore(1 << 20, tmp_path).put(key, value)
        path = entry(EmbedStore(1 << 20, tmp_path), key)
        if alter is None:  # a well-formed, digested entry whose values are not finite
            from nanovl.engine.embed_store import content_digest

            bad = value.clone()
            bad[0, 0, 0] = float("nan")
            save_file({"embeds": bad}, path, metadata={"sha256": content_digest(bad)})
        else:
            alter(path)
        fresh = EmbedStore(1 << 20, tmp_path)  # a restart: nothing in memory
        assert fresh.get(key, (2, 4, 8)) is None, name
        assert not path.exists() and fresh.dropped == 1, name
    key = "ff" * 20
    EmbedStore(1 << 20, tmp_path).put(key, value)
    assert torch.equal(EmbedStore(1 << 20, tmp_path).get(key, (2, 4, 8)), value)  # an intact one is served
    assert EmbedStore(1 << 20, tmp_path).get(key, (3, 4, 8)) is None  # but not for another plan


def test_a_corrupted_entry_is_recomputed_to_the_same_answer(tiny_v1, tmp_path):
    vl = nanovl.load(tiny_v1, dtype="float32")
    page = Image.effect_mandelbrot((500, 400), (-2, -1, 1, 1), 30).convert("RGB")
    want = vl.ask(page, "Total?", max_new_tokens=6).text
    vl.processor.store = EmbedStore(1 << 30, tmp_path)
    assert vl.ask(page, "Total?", max_new_tokens=6).text == want
    (path,) = list(tmp_path.rglob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)  # same size, other values
    path.write_bytes(bytes(data))
    vl.processor.store = EmbedStore(1 << 30, tmp_path)  # restarted: reads the altered file
    assert vl.ask(page, "Total?", max_new_tokens=6).text == want
    assert vl.processor.store.dropped == 1 and vl.processor.store.misses == 1
