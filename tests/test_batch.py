"""`nanovl batch`: inputs, one record per content, error records, resume after SIGKILL and after a
torn last line, --retry-failed, and the endpoint path giving the local path's records."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from nanovl.cli import main
from nanovl.documents.batch import done_hashes, expand_inputs
from nanovl.errors import NanovlError


def page(path: Path, text: str):
    im = Image.new("RGB", (320, 200), "white")
    ImageDraw.Draw(im).text((20, 80), text, fill="black")
    im.save(path)


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    for i in range(4):
        page(d / f"p{i}.png", f"page {i}")
    page(d / "sub" / "deep.png", "deep")
    (d / "sub" / "copy.png").write_bytes((d / "p0.png").read_bytes())  # the same content as p0
    (d / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (d / "notes.md").write_text("not a document: never picked up from a folder")
    return d


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_expand_inputs(docs, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("# a comment\ndocs/p1.png\n\ndocs/p2.png\n")
    got = expand_inputs([str(docs / "p3.png"), str(docs), str(docs / "p*.png"), str(listed)])
    names = [p.relative_to(docs).as_posix() for p in got]
    assert names[0] == "p3.png" and len(names) == len(set(names)) == 7
    assert set(names) == {"p0.png", "p1.png", "p2.png", "p3.png", "broken.pdf", "sub/deep.png", "sub/copy.png"}
    for bad in (str(tmp_path / "missing.png"), str(tmp_path / "nothing-*.png")):
        with pytest.raises(NanovlError):
            expand_inputs([bad])


def test_local_batch_resume_and_retry(tiny_v1, docs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = ["batch", str(docs), "--task", "ask", "--question", "What is written?", "--model", str(tiny_v1),
            "--out", str(out), "--max-tokens", "4"]  # fmt: skip
    assert main(args) == 1  # the broken PDF fails; the rest is done
    first = records(out)
    assert len(first) == 6  # 7 files, p0 and sub/copy are one content
    by_doc = {Path(r["document"]).name: r for r in first}
    assert "cannot open PDF" in by_doc["broken.pdf"]["error"] and "result" not in by_doc["broken.pdf"]
    assert by_doc["p0.png"]["same_content"] == [str(docs / "sub" / "copy.png")]
    assert all(isinstance(r["result"]["answer"], str) for n, r in by_doc.items() if n != "broken.pdf")
    assert len({r["sha256"] for r in first}) == 6
    # a second run finds everything done; a torn last line (a crash mid-write) is cut and redone
    capsys.readouterr()
    assert main(args) == 0 and records(out) == first and "0 to do" in capsys.readouterr().err
    with open(out, "a") as f:
        f.write('{"document": "half a rec')
    assert done_hashes(out) == {r["sha256"] for r in first} and records(out) == first
    # --retry-failed: the error record goes and that document is tried again (now removed; a new one added)
    (docs / "broken.pdf").unlink()
    page(docs / "fixed.png", "fixed")
    assert main([*args, "--retry-failed"]) == 0
    now = records(out)
    assert len(now) == 6 and not any("error" in r for r in now)
    assert {Path(r["document"]).name for r in now} == {"p0.png", "p1.png", "p2.png", "p3.png", "deep.png", "fixed.png"}


def test_sigkill_mid_run_then_rerun_has_every_document_once(tiny_v1, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(24):
        page(folder / f"d{i:02d}.png", f"document {i}")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "nanovl.cli", "batch", str(folder), "--task", "ask", "--question", "Total?",
           "--model", str(tiny_v1), "--out", str(out), "--max-tokens", "24"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with = len(out.read_bytes().splitlines())
    assert 3 <= killed_with < 24, killed_with  # killed mid-run
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    docs = [r["document"] for r in records(out)]
    assert sorted(docs) == sorted(str(p) for p in folder.iterdir()) and len(docs) == 24


def test_endpoint_batch_gives_the_local_records(tiny_v1, docs, tmp_path):
    from test_server import LiveServer

    import nanovl
    from nanovl.serve.app import create_app

    (docs / "broken.pdf").unlink()
    model = nanovl.load(tiny_v1, dtype="float32")
    server = LiveServer(create_app(model, "tiny"))
    try:
        for task in (["--task", "convert", "--to", "json"], ["--task", "ask", "--question", "Who?"]):
            local, remote = tmp_path / f"local-{task[1]}.jsonl", tmp_path / f"remote-{task[1]}.jsonl"
            base = ["batch", str(docs), *task, "--max-tokens", "6", "--dtype", "float32"]
            assert main([*base, "--model", str(tiny_v1), "--out", str(local)]) == 0
            rc = main([*base, "--endpoint", server.url + "/v1", "--concurrency", "3", "--out", str(remote)])
            assert rc == 0
            key = lambda r: r["document"]  # noqa: E731 - with 3 in flight, records come in finishing order
            assert sorted(records(remote), key=key) == sorted(records(local), key=key)
    finally:
        server.stop()


def test_workers_and_ray_give_the_local_records(tiny_v1, docs, tmp_path, monkeypatch):
    """2 worker processes, and Ray Data on a local cluster started here (pages as rows, the model as
    an actor pool): the records of the one-process run."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    base = ["batch", str(docs), "--task", "convert", "--to", "json", "--model", str(tiny_v1), "--max-tokens", "6"]
    outs = {name: tmp_path / f"{name}.jsonl" for name in ("one", "workers", "ray")}
    assert main([*base, "--out", str(outs["one"])]) == 1  # broken.pdf
    assert main([*base, "--out", str(outs["workers"]), "--workers", "2"]) == 1
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024)
    try:
        assert main([*base, "--out", str(outs["ray"]), "--ray", "--workers", "2"]) == 1
    finally:
        ray.shutdown()
    key = lambda r: r["document"]  # noqa: E731
    one = sorted(records(outs["one"]), key=key)
    assert len(one) == 6 and sum("error" in r for r in one) == 1
    assert sorted(records(outs["workers"]), key=key) == one
    assert sorted(records(outs["ray"]), key=key) == one
