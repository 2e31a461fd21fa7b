"""`nanovl mcp` driven by the official MCP client, over stdio and over HTTP: every tool on corpus
documents, the resources, progress notifications, and MCP errors (never a crash) for paths outside
the root, missing files, bad page ranges and bad schemas, the server answering after each."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

pytest.importorskip("mcp")
from mcp import Client, StdioServerParameters  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
PDF = CORPUS / "invoice2data" / "AmazonWebServices.pdf"
IMAGE = CORPUS / "sroie" / "sroie_000.jpg"
pytestmark = pytest.mark.skipif(not PDF.is_file(), reason=f"the shared corpus is not at {CORPUS}")


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "receipts").mkdir(parents=True)
    shutil.copy(PDF, r / "invoice.pdf")
    shutil.copy(IMAGE, r / "receipts" / "r0.jpg")
    (r / "notes.txt").write_text("not a document")
    os.symlink(CORPUS / "invoice2data" / "FlipkartInvoice.pdf", r / "elsewhere.pdf")  # a real PDF, outside
    return r


def command(root: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nanovl.cli", "mcp", "--root", str(root), "--model", str(model), *extra]


def text(result) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def data(result):
    """A tool's structured result (a list comes wrapped as {"result": [...]})."""
    d = result.structured_content
    return d["result"] if isinstance(d, dict) and set(d) == {"result"} else d


async def exercise(client: Client):
    tools = {t.name for t in (await client.list_tools()).tools}
    assert tools == {"list_documents", "read_page", "ask_document", "extract", "search_documents"}

    async def up():  # the server still answers
        r = await client.call_tool("list_documents", {})
        assert not r.is_error
        return data(r)

    docs = await up()
    assert [(d["path"], d["pages"]) for d in docs] == [("invoice.pdf", 1), ("receipts/r0.jpg", 1)]

    progress = []

    async def on_progress(done, total, message):
        progress.append((done, total, message))

    r = await client.call_tool("read_page", {"path": "invoice.pdf", "page": 1}, progress_callback=on_progress)
    assert not r.is_error and text(r).strip()
    assert progress and progress[-1][0] == progress[-1][1] == 1
    page_text = text(r)

    for bad, why in (
        ("../root/invoice.pdf", "'..' is refused"),
        (str(PDF), "absolute paths are refused"),
        ("elsewhere.pdf", "outside the root"),
        ("missing.pdf", "no such document"),
        ("notes.txt", "not a document"),
    ):
        r = await client.call_tool("read_page", {"path": bad})
        assert r.is_error and why in text(r), (bad, text(r))
        await up()
    r = await client.call_tool("read_page", {"path": "invoice.pdf", "page": 3})
    assert r.is_error and "out of range" in text(r)
    r = await client.call_tool("ask_document", {"path": "invoice.pdf", "question": "Total?", "pages": "2-4"})
    assert r.is_error and "out of range" in text(r)
    r = await client.call_tool("extract", {"path": "invoice.pdf", "schema": {"type": "array"}})
    assert r.is_error and "must be an object" in text(r)
    r = await client.call_tool("extract", {"path": "invoice.pdf"})
    assert r.is_error and "one of them" in text(r)
    await up()

    # resources: the document list and a converted page (the cached one read_page made)
    listed = await client.list_resources()
    assert "nanovl://documents" in [str(x.uri) for x in listed.resources]
    res = await client.read_resource("nanovl://documents")
    assert [d["path"] for d in json.loads(res.contents[0].text)] == ["invoice.pdf", "receipts/r0.jpg"]
    res = await client.read_resource("nanovl://page/invoice.pdf/1")
    assert res.contents[0].text == page_text
    r = await client.call_tool("ask_document", {"path": "receipts/r0.jpg", "question": "What is the total?"})
    assert not r.is_error and data(r)["pages"] == [1]
    r = await client.call_tool("extract", {"path": "invoice.pdf", "fields": "total,date"})
    assert not r.is_error
    fields = json.loads(text(r))["fields"]
    assert set(fields) == {"total", "date"} and all(
        {"value", "confidence", "evidence"} <= set(v) for v in fields.values()
    )
    # search: a word of the page read above is found there (the index covers every page, converting the rest)
    import re

    word = re.search(r"[A-Za-z0-9]{2,}", page_text).group(0)  # the random model's page has letters
    progress.clear()
    r = await client.call_tool("search_documents", {"query": word}, progress_callback=on_progress)
    assert not r.is_error and progress[-1][0] == progress[-1][1] == 2  # both documents' pages indexed
    assert {"path": "invoice.pdf", "page": 1} in [{"path": h["path"], "page": h["page"]} for h in data(r)]
    r = await client.call_tool("search_documents", {"query": "zzzqqq"})
    assert not r.is_error and data(r) == []


def test_mcp_over_stdio(tiny_v1, root):
    params = StdioServerParameters(command=sys.executable, args=command(root, tiny_v1)[1:],
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip

    async def main():
        async with Client(params, read_timeout_seconds=300) as client:
            await exercise(client)

    anyio.run(main)
    assert (root / ".nanovl-cache" / "index.sqlite").is_file()  # the index persists under the root


def test_mcp_over_http(tiny_v1, root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command(root, tiny_v1, "--transport", "http", "--port", str(port)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)

        async def main():
            async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=300) as client:
                await exercise(client)

        anyio.run(main)
    finally:
        proc.terminate()
        proc.wait(30)
