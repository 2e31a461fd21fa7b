"""`nanovl mcp`: the document workflows as an MCP server (the official `mcp` SDK), for agents.

Tools: list_documents, read_page (a page as Markdown), ask_document, extract (grounded fields),
search_documents (full text over converted pages). Resources: each document, and each converted
page (`nanovl://page/{path}/{page}`). The same functions as `nanovl convert / ask / extract`, on a
model loaded here or an OpenAI-compatible endpoint.

- Every path is relative to the root and confined to it: absolute paths, `..`, and symlinks that
  resolve outside are refused; so are files that are not documents, or larger than MAX_BYTES.
- Page ranges are checked against the document and bounded (MAX_PAGES per question or extraction).
- Failures are tool errors (`is_error`, the reason in the text); the server stays up.
- Converted pages are cached under ROOT/.nanovl-cache/ by content hash, page and model, and indexed
  there (SQLite FTS5), so a restart keeps both. Long tools report progress per page.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError

from nanovl.errors import NanovlError

MAX_PAGES = 32  # pages one ask_document / extract call may send to the model
MAX_BYTES = 256 * 1024 * 1024  # a document larger than this is refused
CACHE = ".nanovl-cache"


class Library:
    """The documents under one root: confined paths, converted pages (cached) and the search index."""

    def __init__(self, root: str | Path, backend):
        from nanovl.documents.batch import DOCUMENT_SUFFIXES

        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NanovlError(f"{root}: not a folder (give --root DIR)")
        self.backend, self.suffixes = backend, DOCUMENT_SUFFIXES
        self.cache = self.root / CACHE
        self.cache.mkdir(exist_ok=True)
        self.lock = threading.Lock()  # the index and the cache files
        self.db = sqlite3.connect(self.cache / "index.sqlite", check_same_thread=False)
        self.db.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS pages USING fts5(path, page UNINDEXED, key UNINDEXED, text)"
        )
        self.model = hashlib.sha256(str(getattr(backend, "name", "")).encode()).hexdigest()[:12]

    def path(self, rel: str) -> Path:
        """A document path relative to the root -> the file, or a tool error saying why not."""
        if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
            raise ToolError("give a document path relative to the root")
        p = Path(rel)
        if p.is_absolute():
            raise ToolError(f"{rel}: absolute paths are refused; give a path relative to the root")
        if ".." in p.parts:
            raise ToolError(f"{rel}: '..' is refused; paths stay inside the root")
        real = (self.root / p).resolve()
        if not real.is_relative_to(self.root) or CACHE in real.relative_to(self.root).parts:
            raise ToolError(f"{rel}: outside the root (a symlink that leaves it)")
        if not real.is_file():
            raise ToolError(f"{rel}: no such document under the root")
        if real.suffix.lower() not in self.suffixes:
            raise ToolError(f"{rel}: not a document nanovl reads ({', '.join(self.suffixes)})")
        if real.stat().st_size > MAX_BYTES:
            raise ToolError(f"{rel}: larger than the {MAX_BYTES >> 20} MiB a document may be")
        return real

    def documents(self) -> list[dict]:
        from nanovl.processor import scan_media

        out = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if CACHE in rel.parts or not p.is_file() or p.suffix.lower() not in self.suffixes:
                continue
            if not p.resolve().is_relative_to(self.root):
                continue  # a symlink out of the root is not listed either
            try:
                pages, error = len(scan_media([p])), None
            except NanovlError as e:
                pages, error = None, str(e)
            out.append({"path": rel.as_posix(), "pages": pages, "bytes": p.stat().st_size,
                        **({"error": error} if error else {})})  # fmt: skip
        return out

    def pages(self, path: Path, spec: str | None, limit: int | None = MAX_PAGES) -> list:
        from nanovl.processor import scan_media

        try:
            media = scan_media([path], spec)
        except NanovlError as e:
            raise ToolError(str(e)) from None
        if limit is not None and len(media) > limit:
            raise ToolError(f"{len(media)} pages selected; at most {limit} per call (use pages, e.g. 1-{limit})")
        return media

    def key(self, path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def page_markdown(self, path: Path, page: int) -> str:
        """One page as Markdown: from the cache, else converted now (and cached, and indexed)."""
        from nanovl.documents.convert import PROMPT

        media = self.pages(path, None, limit=None)
        if not 1 <= page <= len(media):
            raise ToolError(f"page {page} is out of range: the document has {len(media)} page(s)")
        key = self.key(path)
        cached = self.cache / "pages" / f"{key}-{self.model}-{page}.md"
        if cached.is_file():
            return cached.read_text(encoding="utf-8")
        try:
            text = self.backend.complete([media[page - 1]], PROMPT, 2048).text.strip()
        except NanovlError as e:
            raise ToolError(str(e)) from None
        rel = path.relative_to(self.root).as_posix()
        with self.lock:
            cached.parent.mkdir(exist_ok=True)
            cached.write_text(text, encoding="utf-8")
            self.db.execute("DELETE FROM pages WHERE path = ? AND page = ?", (rel, page))
            self.db.execute("INSERT INTO pages VALUES (?, ?, ?, ?)", (rel, page, key, text))
            self.db.commit()
        return text

    def search(self, query: str, limit: int) -> list[dict]:
        terms = [t for t in query.replace('"', " ").split() if t]
        if not terms:
            raise ToolError("give words to search for")
        match = " ".join(f'"{t}"' for t in terms)  # every word, as a literal (no FTS syntax from the client)
        with self.lock:
            rows = self.db.execute(
                "SELECT path, page, snippet(pages, 3, '[', ']', '...', 12) FROM pages WHERE pages MATCH ? "
                "ORDER BY rank LIMIT ?", (match, limit),
            ).fetchall()  # fmt: skip
        return [{"path": p, "page": int(n), "snippet": s} for p, n, s in rows]


def build_server(library: Library):
    """The MCP server around a Library."""
    mcp = MCPServer("nanovl", instructions="Documents under one folder: list, read, ask, extract (grounded), search.")

    async def each_page(ctx: Context, path: Path, numbers: list[int]) -> list[str]:
        out = []
        for i, n in enumerate(numbers):
            await ctx.report_progress(i, len(numbers), f"converting page {n}")
            out.append(await anyio.to_thread.run_sync(library.page_markdown, path, n))
        await ctx.report_progress(len(numbers), len(numbers), "done")
        return out

    @mcp.tool()
    async def list_documents() -> list[dict]:
        """The documents under the root: path, page count, size in bytes."""
        return await anyio.to_thread.run_sync(library.documents)

    @mcp.tool()
    async def read_page(path: str, page: int = 1, ctx: Context = None) -> str:
        """One page of a document as Markdown (converted by the model, then cached)."""
        return (await each_page(ctx, library.path(path), [page]))[0]

    @mcp.tool()
    async def ask_document(path: str, question: str, pages: str | None = None, ctx: Context = None) -> dict[str, Any]:
        """Ask a question about a document (pages: e.g. "1-3", at most 32); the answer and the pages used."""
        if not question.strip():
            raise ToolError("give a question")
        doc = library.path(path)
        media = library.pages(doc, pages)
        await ctx.report_progress(0, 1, f"reading {len(media)} page(s)")
        try:
            answer = await anyio.to_thread.run_sync(library.backend.complete, media, question, 256)
        except NanovlError as e:
            raise ToolError(str(e)) from None
        await ctx.report_progress(1, 1, "done")
        from nanovl.documents.convert import page_number

        return {"answer": answer.text.strip(), "pages": [page_number(m, k) for k, m in enumerate(media)]}

    @mcp.tool()
    async def extract(path: str, schema: dict | None = None, fields: str | None = None, pages: str | None = None,
                      ctx: Context = None) -> dict[str, Any]:  # fmt: skip
        """Fields of a document as JSON: a JSON schema (an object with properties) or field names
        ("total,date"); every value with its confidence and evidence (page, box, text)."""
        from nanovl.documents.extract import check_extract_schema, fields_schema
        from nanovl.documents.extract import extract as run

        if (schema is None) == (fields is None):
            raise ToolError("give schema (a JSON schema) or fields (names separated by commas), one of them")
        try:
            schema = check_extract_schema(schema) if schema is not None else fields_schema(fields)
        except NanovlError as e:
            raise ToolError(str(e)) from None
        doc = library.path(path)
        library.pages(doc, pages)  # checked and bounded before any page is rendered
        await ctx.report_progress(0, 1, "extracting")
        try:
            result = await anyio.to_thread.run_sync(lambda: run(library.backend, doc, schema, pages))
        except NanovlError as e:
            raise ToolError(str(e)) from None
        await ctx.report_progress(1, 1, "done")
        return result

    @mcp.tool()
    async def search_documents(query: str, limit: int = 10, ctx: Context = None) -> list[dict]:
        """Full-text search over the converted pages of every document (pages not yet converted are
        converted first, once; the index persists under the root's cache folder)."""
        if not 1 <= limit <= 100:
            raise ToolError("limit must be in [1, 100]")
        todo = []
        for d in await anyio.to_thread.run_sync(library.documents):
            for n in range(1, (d["pages"] or 0) + 1):
                todo.append((library.root / d["path"], n))
        for i, (doc, n) in enumerate(todo):
            await ctx.report_progress(i, len(todo), f"indexing {doc.name} page {n}")
            try:
                await anyio.to_thread.run_sync(library.page_markdown, doc, n)
            except ToolError:
                continue  # a page that cannot be converted is left out of the index
        await ctx.report_progress(len(todo), len(todo), "searching")
        return await anyio.to_thread.run_sync(library.search, query, limit)

    @mcp.resource("nanovl://documents", name="documents", mime_type="application/json")
    async def documents_resource() -> str:
        """The documents under the root, as list_documents gives them."""
        return json.dumps(await anyio.to_thread.run_sync(library.documents))

    @mcp.resource("nanovl://page/{path}/{page}", name="page", mime_type="text/markdown")
    async def page_resource(path: str, page: str) -> str:
        """A converted page (path with / written as %2F)."""
        from urllib.parse import unquote

        try:
            return await anyio.to_thread.run_sync(library.page_markdown, library.path(unquote(path)), int(page))
        except ValueError:
            raise ResourceError(f"{page!r} is not a page number") from None
        except ToolError as e:  # the same reasons, as a resource error
            raise ResourceError(str(e)) from None

    return mcp


def serve_mcp(root: str, backend, transport: str = "stdio", host: str = "127.0.0.1", port: int = 8765):
    server = build_server(Library(root, backend))
    if transport == "stdio":
        server.run("stdio")
    elif transport == "http":
        import uvicorn

        uvicorn.run(server.streamable_http_app(host=host), host=host, port=port, log_level="warning")
    else:
        raise NanovlError(f"--transport must be stdio or http, not {transport!r}")
