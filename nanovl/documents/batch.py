"""Batch jobs over many documents (`nanovl batch`): one JSONL record per document, resumable.

- Inputs: files, folders (every image and PDF below them), glob patterns, and list files (`.txt` /
  `.lst`, one path per line). Documents are hashed (SHA-256 of their bytes) and a content is done
  once: identical files are one record listing all their paths.
- Resume: a document whose hash already has a record in the output is skipped (an error record too,
  so each document is in the output once; `--retry-failed` drops those and tries them again); a
  last line cut off by a crash is dropped first. Each record is written whole and flushed to disk as
  its document ends, so a run killed at any point loses at most the documents in flight.
- A document that fails gives an error record; the batch goes on.
- Work units: a page for `convert` (pages rendered one at a time, only when their turn comes), a
  document for `ask` and `extract` (one prompt over its pages). With `--endpoint`, `concurrency`
  units are in flight at once; a local model answers one unit at a time.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from nanovl.errors import NanovlError

DOCUMENT_SUFFIXES = (".pdf", ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
LIST_SUFFIXES = (".txt", ".lst")
TASKS = ("ask", "extract", "convert")


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (recursively: images and PDFs), globs and list files -> document paths, in order,
    each once. A name that matches nothing is an error (a typo should not run an empty batch)."""
    out: dict[Path, None] = {}

    def add(p: Path):
        out.setdefault(p, None)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES:
                    add(p)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            base = path.parent
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    listed = Path(line) if Path(line).is_absolute() else base / line
                    add(listed)  # a listed file that is missing gets its error record
        elif path.is_file():
            add(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise NanovlError(f"{item}: no file matches this pattern")
            for p in matches:
                if p.is_file():
                    add(p)
        else:
            raise NanovlError(f"{item}: no such file, folder or pattern")
    return list(out)


def file_hash(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def done_hashes(out: Path) -> set[str]:
    """The hashes with a record in `out`; a last line without its newline (a crash mid-write) is cut."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    hashes = set()
    for line in data.splitlines():
        try:
            hashes.add(json.loads(line)["sha256"])
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours: left as it is
    return hashes


def drop_failed(out: Path) -> int:
    """Remove the error records from `out` (rewritten atomically); returns how many."""
    if not out.exists():
        return 0
    done_hashes(out)  # first cut a torn last line
    keep, dropped = [], 0
    for line in out.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            failed = "error" in json.loads(line)
        except ValueError:
            failed = False
        dropped += failed
        if not failed:
            keep.append(line)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, out)
    return dropped


@dataclass
class Job:
    """One document (one content): its paths, hash, and its results as they come."""

    paths: list[Path]
    sha256: str | None
    pages: int = 0
    results: dict = field(default_factory=dict)  # unit index -> result
    error: str | None = None
    units: int = 1
    finished: int = 0  # units done (or skipped after an error)


def plan_jobs(paths: list[Path]) -> list[Job]:
    by_hash: dict[str, Job] = {}
    jobs = []
    for p in paths:
        h = file_hash(p)
        if h is not None and h in by_hash:
            by_hash[h].paths.append(p)
            continue
        job = Job([p], h)
        jobs.append(job)
        if h is not None:
            by_hash[h] = job
    return jobs


class Task:
    """What is done to each document, by path (so that worker processes can do it too): `units(path)`
    gives (pages, work units) and may raise (the document cannot be opened), `run(path, k)` does unit
    k and returns something picklable, `record(job)` assembles a finished job's result."""

    name = ""

    def __init__(self, backend, pages=None, dpi=None, max_tiles=None, max_tokens=None):
        from nanovl.media import DEFAULT_DPI

        self.backend, self.pages, self.dpi, self.max_tiles = backend, pages, dpi or DEFAULT_DPI, max_tiles
        self.max_tokens = max_tokens

    def options(self) -> dict:
        """The keyword arguments that rebuild this task around another backend (worker processes)."""
        return {"pages": self.pages, "dpi": self.dpi, "max_tiles": self.max_tiles, "max_tokens": self.max_tokens}

    def media(self, path: str):
        from nanovl.processor import scan_media

        return scan_media([path], self.pages, self.dpi)  # headers only: pages render when encoded

    def units(self, path: str) -> tuple[int, int]:
        return len(self.media(path)), 1

    def record(self, job: Job) -> dict:
        return job.results[0]


class AskTask(Task):
    name = "ask"

    def __init__(self, backend, question: str, **kw):
        super().__init__(backend, **kw)
        if not question or not question.strip():
            raise NanovlError("--task ask needs --question")
        self.question = question

    def options(self) -> dict:
        return {**super().options(), "question": self.question}

    def run(self, path: str, k: int):
        a = self.backend.complete(self.media(path), self.question, self.max_tokens or 256, None, self.max_tiles)
        return {"answer": a.text.strip(), "finish_reason": a.finish_reason}


class ExtractTask(Task):
    name = "extract"

    def __init__(self, backend, schema: dict, calibration=None, **kw):
        super().__init__(backend, **kw)
        self.schema, self.calibration = schema, calibration

    def options(self) -> dict:
        return {**super().options(), "schema": self.schema, "calibration": self.calibration}

    def run(self, path: str, k: int):
        from nanovl.documents.extract import extract

        return extract(self.backend, path, self.schema, self.pages, self.dpi, self.max_tiles,
                       self.max_tokens, self.calibration)  # fmt: skip


class ConvertTask(Task):
    name = "convert"

    def __init__(self, backend, to: str = "markdown", **kw):
        from nanovl.documents.convert import FORMATS

        super().__init__(backend, **kw)
        if to not in FORMATS:
            raise NanovlError(f"--to must be one of {', '.join(FORMATS)}, not {to!r}")
        self.to = to
        self._scanned: dict[str, list] = {}  # the pages of the documents being converted (headers)

    def options(self) -> dict:
        return {**super().options(), "to": self.to}

    def units(self, path: str) -> tuple[int, int]:
        n = len(self.media(path))
        return n, n

    def run(self, path: str, k: int):
        from nanovl.documents.convert import PROMPT, blocks, page_number

        if path not in self._scanned:
            if len(self._scanned) > 8:  # documents long finished; a page is never rendered twice anyway
                self._scanned.pop(next(iter(self._scanned)))
            self._scanned[path] = self.media(path)
        page = self._scanned[path][k]
        a = self.backend.complete([page], PROMPT, self.max_tokens or 2048, None, self.max_tiles)
        text = a.text.strip()
        return {
            "page": page_number(page, k),
            "blocks": blocks(text),
            "markdown": text,
            "finish_reason": a.finish_reason,
        }

    def record(self, job: Job) -> dict:
        from nanovl.documents.convert import to_html

        self._scanned.pop(str(job.paths[0]), None)
        pages = [job.results[k] for k in range(job.units)]
        if self.to == "markdown":
            return {"markdown": "\n\n".join(f"<!-- page {p['page']} -->\n\n{p['markdown']}" for p in pages) + "\n"}
        if self.to == "html":
            sections = (f'<section data-page="{p["page"]}">\n{to_html(p["markdown"])}</section>\n' for p in pages)
            return {"html": "".join(sections)}
        return {"pages": pages}


_WORKER: dict = {}  # in a worker process: its task, around its own copy of the model


def _init_worker(cls, options: dict, model: str, dtype: str | None, threads: int):
    import torch

    import nanovl
    from nanovl.documents.backends import LocalBackend

    torch.set_num_threads(threads)
    _WORKER["task"] = cls(LocalBackend(nanovl.load(model, dtype)), **options)


def _work(path: str, k: int):
    return _WORKER["task"].run(path, k)


class RayWorker:
    """A Ray Data actor: the task around its own copy of the model; one row (a work unit) in, the
    row with its result (JSON text) or its error out."""

    def __init__(self, cls, options: dict, model: str, dtype: str | None, threads: int):
        _init_worker(cls, options, model, dtype, threads)

    def __call__(self, batch: dict) -> dict:
        results, errors = [], []
        for path, k in zip(batch["path"], batch["k"]):
            try:
                results.append(json.dumps(_work(str(path), int(k))))
                errors.append("")
            except Exception as e:  # noqa: BLE001 - the document's error record
                results.append("")
                errors.append(describe(e))
        return {**batch, "result": results, "error": errors}


def run_ray(jobs: list[Job], task: Task, out: Path, address: str | None, model: str, dtype: str | None,
            workers: int = 1, progress: Callable[[int], None] | None = None) -> dict:  # fmt: skip
    """The same job on a Ray cluster through Ray Data: work units (pages for convert) are rows, the
    model an actor pool of `workers` (each with its own copy), records written as documents finish.
    address None: a local cluster on this machine. The document paths must be readable on every node."""
    try:
        import ray
    except ImportError:
        raise NanovlError("--ray needs Ray Data: pip install 'ray[data]'") from None
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)  # its per-stage progress lines, on every run
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     object_store_memory=512 * 1024 * 1024)  # fmt: skip
    rows, by_index = [], {}
    counts = {"done": 0, "failed": 0}
    with open(out, "a", encoding="utf-8") as f:
        records = _Records(f, task, counts, progress)
        for i, job in enumerate(jobs):
            by_index[i] = job
            rows += [{"job": i, "path": str(job.paths[0]), "k": k} for k in range(records.open(job))]
        if not rows:
            return counts
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64 * workers))
        ds = ds.map_batches(RayWorker, batch_size=1, concurrency=workers, num_cpus=threads,
                            fn_constructor_args=(type(task), task.options(), model, dtype, threads))  # fmt: skip
        for row in ds.iter_rows():
            result = json.loads(row["result"]) if not row["error"] else None
            records.unit_done(by_index[int(row["job"])], int(row["k"]), result, row["error"] or None)
    return counts


class _Records:
    """The bookkeeping both runners share: a job opened (its units counted, or its error recorded), a
    unit finished, and a finished job's record appended: one write, flushed and fsynced (a crash
    loses no record)."""

    def __init__(self, f, task: Task, counts: dict, progress):
        self.f, self.task, self.counts, self.progress = f, task, counts, progress

    def open(self, job: Job) -> int:
        """The job's work units (0 when it cannot be opened: its error record is written now)."""
        try:
            if job.sha256 is None:
                raise NanovlError(f"{job.paths[0]}: cannot read the file")
            job.pages, job.units = self.task.units(str(job.paths[0]))
        except Exception as e:  # noqa: BLE001 - a document that cannot be opened is its record
            job.error, job.units = describe(e), 0
        if job.units == 0:
            self.write(job)
        return job.units

    def unit_done(self, job: Job, k: int, result=None, error: str | None = None):
        """Unit k of the job ended (with a result, an error, or skipped after an earlier error)."""
        if error:
            job.error = job.error or error
        elif job.error is None and result is not None:
            job.results[k] = result
        job.finished += 1
        if self.progress is not None and self.task.name == "convert":
            self.progress(1)
        if job.finished == job.units:
            self.write(job)

    def write(self, job: Job):
        record = {"document": str(job.paths[0]), "sha256": job.sha256, "task": self.task.name, "pages": job.pages}
        if len(job.paths) > 1:
            record["same_content"] = [str(p) for p in job.paths[1:]]
        if job.error is None:
            record["result"] = self.task.record(job)
        else:
            record["error"] = job.error
        self.counts["failed" if job.error else "done"] += 1
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        job.results.clear()
        if self.progress is not None and self.task.name != "convert":
            self.progress(job.pages)


def describe(e: Exception) -> str:
    """An error record's text: the message of a user-facing error, the type too for anything else."""
    return str(e) if isinstance(e, NanovlError) else f"{type(e).__name__}: {e}"


def count_pages(jobs: list[Job], task: Task) -> int:
    """Every document's page count from its headers (for the progress bar); unreadable ones count 0
    here and fail in the run with their reason."""
    total = 0
    for job in jobs:
        try:
            job.pages = len(task.media(str(job.paths[0])))
        except Exception:  # noqa: BLE001 - reported when the document's turn comes
            job.pages = 0
        total += job.pages
    return total


def run_batch(jobs: list[Job], task: Task, out: Path, concurrency: int = 1,
              progress: Callable[[int], None] | None = None, workers: int = 1, model: str | None = None,
              dtype: str | None = None) -> dict:  # fmt: skip
    """Do every job's units with at most `concurrency` in flight (documents opened in order, as the
    window allows) and append each document's record to `out` when its last unit ends. workers > 1:
    that many processes, each with its own copy of `model` and its share of the CPU threads (the
    task's own backend is then unused). progress(n): called with the pages just finished. Returns
    {"done", "failed"}."""
    import multiprocessing

    counts = {"done": 0, "failed": 0}
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        init = (type(task), task.options(), model, dtype, threads)
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker, init)
        width, work = 2 * workers, _work  # one queued behind each running unit
    else:
        pool, width, work = ThreadPoolExecutor(max(concurrency, 1)), max(concurrency, 1), task.run
    with open(out, "a", encoding="utf-8") as f, pool:
        records = _Records(f, task, counts, progress)

        def units() -> Iterator[tuple[Job, int]]:
            for job in jobs:
                for k in range(records.open(job)):
                    yield job, k

        pending: dict = {}
        source = units()
        while True:
            while len(pending) < width and (nxt := next(source, None)) is not None:
                job, k = nxt
                if job.error is not None:  # an earlier page of this document failed: skip the rest
                    records.unit_done(job, k)
                    continue
                pending[pool.submit(work, str(job.paths[0]), k)] = nxt
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job, k = pending.pop(fut)
                result, error = None, None
                try:
                    result = fut.result()
                except Exception as e:  # noqa: BLE001 - one document's failure never stops the batch
                    error = describe(e)
                records.unit_done(job, k, result, error)
    return counts
