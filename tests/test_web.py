"""The web page at / of `nanovl serve`, driven in headless Chromium (Debian's chromium, through
Playwright): the API key asked once, a corpus PDF uploaded, its thumbnails and tile grid, a question
with its answer streamed in, an extraction's values with their confidence, a page converted to
Markdown, an evidence box drawn (a random model's free text is never on the page, so the schema
makes it choose between two printed strings), and the message shown when the server answers an
error. A screenshot of each step goes to the test's folder."""

import shutil
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
PDF = CORPUS / "docling" / "multi_page.pdf"
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (apt-get install chromium)"),
    pytest.mark.skipif(not PDF.is_file(), reason=f"the shared corpus is not at {CORPUS}"),
]


@pytest.fixture(scope="module")
def server(tiny_v1):
    """`nanovl serve` with the tiny checkpoint and an API key, as a user starts it."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanovl.cli", "serve", "--model", str(tiny_v1), "--port", str(port),
           "--api-key", "secret", "--served-model-name", "tiny"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.3)
    yield SimpleNamespace(url=url)
    proc.terminate()
    proc.wait(30)


def test_the_page_end_to_end(server, tmp_path):
    import json

    import pypdfium2 as pdfium

    from nanovl.synth.kinds import make_doc
    from nanovl.synth.pdf import write_pdf

    # a random model's free text is never on the page, but a choice between two printed strings
    # (an enum in the schema) is: a digital synthetic invoice, whose vendor and number are both drawn
    doc = make_doc("invoice", 1_000_003, 0)
    write_pdf(doc, tmp_path / "invoice.pdf")
    choices = [doc.fields["vendor"], doc.fields["invoice_number"]]
    schema = {"type": "object", "properties": {"issuer": {"enum": choices}}, "required": ["issuer"]}
    pages = len(pdfium.PdfDocument(PDF))
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # the test's own waits evaluate script strings, which the page's CSP forbids: bypassed here only
        page = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True).new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(server.url + "/")
        # no key yet: the page asks for one; a wrong one is said to be wrong
        page.wait_for_selector("#keyform:not([hidden])")
        assert "none was given" in page.inner_text("#error")
        page.fill("#key", "wrong")
        page.click("#keyform button")
        page.wait_for_function("document.getElementById('error').textContent.includes('wrong')")
        page.screenshot(path=shots / "1-wrong-key.png")
        page.fill("#key", "secret")
        page.click("#keyform button")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        assert page.is_hidden("#error") and page.is_hidden("#keyform")
        # a corpus PDF: one thumbnail per page, the first page shown with its tile grid
        page.set_input_files("#file", str(PDF))
        page.wait_for_function(f"document.querySelectorAll('#thumbs img').length === {pages}")
        assert "tiles" in page.inner_text("#tileinfo") and "page 1" in page.inner_text("#tileinfo")
        page.click("#thumbs img:nth-child(2)")
        page.wait_for_function("document.getElementById('tileinfo').textContent.startsWith('page 2')")
        page.screenshot(path=shots / "2-thumbnails-and-grid.png")
        # ask: the answer arrives in pieces (streamed)
        page.fill("#question", "What is this page about?")
        page.click("#askform button")
        page.wait_for_function("document.getElementById('answer').textContent.length > 0")
        page.screenshot(path=shots / "3-answer.png")
        # extract for real: values and confidences; the random model's values are not on the page
        page.fill("#fields", "title,date")
        page.click("#extractform button")
        page.wait_for_function("document.querySelectorAll('#fieldtable tr').length === 2")
        assert page.locator(".conf").count() == 2
        page.screenshot(path=shots / "4-extraction.png")
        # convert: the page's Markdown rendered (the server's sanitised HTML)
        page.click("#convertform button")
        page.wait_for_function("document.getElementById('markdown').innerHTML.length > 0")
        page.screenshot(path=shots / "6-markdown.png")
        # a real evidence box: the model picks one of two strings printed on the page, found in its text layer
        page.set_input_files("#file", str(tmp_path / "invoice.pdf"))
        page.wait_for_function("document.querySelectorAll('#thumbs img').length === 1")
        page.fill("#schema", json.dumps(schema))
        page.click("#extractform button")
        page.wait_for_function("document.getElementById('overlay').dataset.boxes === '1'")
        assert "page 1:" in page.inner_text("#fieldtable")
        page.screenshot(path=shots / "5-evidence-box.png")
        # a server error is shown, not swallowed: a PDF the server cannot open
        page.set_input_files("#file", files=[{"name": "broken.pdf", "mimeType": "application/pdf",
                                              "buffer": b"%PDF-1.4 broken"}])  # fmt: skip
        page.wait_for_function("document.getElementById('error').textContent.includes('cannot open PDF')")
        page.screenshot(path=shots / "7-error.png")
        browser.close()
    assert all(u.startswith(server.url) or u.startswith("data:") for u in requests), requests  # no CDN, no network
    assert len(list(shots.iterdir())) == 7
    import httpx

    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
