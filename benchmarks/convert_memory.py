"""Memory of `nanovl convert` against document length: peak RSS for a short and a long synthetic PDF,
with a tiny random model, each in a fresh process.

    python benchmarks/convert_memory.py [--workdir /tmp/nanovl-bench] [--pages 10 1000]

Pages are rendered and converted one at a time, so the peak should not grow with the page count.
Prints one row per length: pages, seconds, pages/s, peak RSS, and the ratio to the shortest.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_pdf(path: Path, pages: int, base: Path):
    """`pages` pages cycled from the pages of a few synthetic documents (pypdfium2 page import)."""
    import pypdfium2 as pdfium

    src = pdfium.PdfDocument(base)
    out = pdfium.PdfDocument.new()
    n = len(src)
    for start in range(0, pages, n):
        out.import_pages(src, list(range(min(n, pages - start))))
    out.save(path)


def base_pdf(workdir: Path) -> Path:
    """A 7-page PDF: one synthetic document of each kind, merged."""
    import pypdfium2 as pdfium

    from nanovl.synth.kinds import KINDS, make_doc
    from nanovl.synth.pdf import write_pdf

    path = workdir / "base.pdf"
    if not path.is_file():
        merged = pdfium.PdfDocument.new()
        for kind in KINDS:
            one = workdir / f"{kind}.pdf"
            write_pdf(make_doc(kind, 1_000_000, 0), one)
            merged.import_pages(pdfium.PdfDocument(one), [0])
        merged.save(path)
    return path


def child(args):
    """Run `nanovl convert` in this process, then print its own peak RSS (MiB)."""
    from nanovl.cli import main

    rc = main(["convert", "--model", args.model, args.pdf, "--out", args.out, "--max-tokens", "4", "--dpi", "72"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RC {rc} PEAK {peak:.1f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/nanovl-bench")
    p.add_argument("--pages", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--child", nargs=3, metavar=("MODEL", "PDF", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.model, args.pdf, args.out = args.child
        return child(args)
    workdir = Path(args.workdir) / "convert-memory"
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "tiny-vl"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "nanovl.cli", "make-tiny", "nemotron-nano-vl-v1", str(model)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    base = base_pdf(workdir)
    rows = []
    for n in args.pages:
        pdf = workdir / f"doc-{n}.pdf"
        make_pdf(pdf, n, base)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--child", str(model), str(pdf), str(workdir / f"doc-{n}.md")],
                           capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - t
        line = [x for x in r.stdout.splitlines() if x.startswith("RC ")]
        if r.returncode or not line or not line[0].startswith("RC 0"):
            sys.exit(f"convert of {n} pages failed:\n{r.stderr[-2000:]}")
        peak = float(line[0].split()[-1])
        marks = (workdir / f"doc-{n}.md").read_text().count("<!-- page ")
        assert marks == n, (marks, n)
        rows.append((n, seconds, peak))
    print(f"{'pages':>6} {'seconds':>8} {'pages/s':>8} {'peak RSS MiB':>13} {'vs shortest':>12}")
    for n, seconds, peak in rows:
        print(f"{n:>6} {seconds:>8.1f} {n / seconds:>8.1f} {peak:>13.1f} {peak / rows[0][2]:>12.3f}")


if __name__ == "__main__":
    main()
