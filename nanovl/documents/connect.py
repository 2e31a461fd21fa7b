"""`--model DIR` or `--endpoint URL` -> a documents backend (the CLI's and eval's; apart from
backends.py, which nanovl.api imports, because this one loads models through nanovl.load)."""

from __future__ import annotations

from nanovl.errors import NanovlError


def open_backend(model: str | None, endpoint: str | None, api_key: str | None, dtype: str | None):
    """--model DIR or --endpoint URL (one of them) -> a documents backend."""
    from nanovl.documents.backends import EndpointBackend, LocalBackend

    if bool(model) == bool(endpoint):
        raise NanovlError("give --model DIR (run here) or --endpoint URL (an OpenAI-compatible server), one of them")
    if endpoint:
        return EndpointBackend(endpoint, api_key)
    import nanovl

    return LocalBackend(nanovl.load(model, dtype))
