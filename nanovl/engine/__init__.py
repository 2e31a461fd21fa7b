"""The generation engine: token ids (and embeddings) in, tokens and text deltas out. Knows nothing of
HTTP: the server's request formats (OpenAI's response_format included) are parsed in serve/."""

from nanovl.engine.generate import Completion, TokenGenerator, generate, stream
from nanovl.engine.sampling import SamplingParams
from nanovl.engine.step import Delta, TokenStep
from nanovl.models.cache import KVCache

__all__ = ["Completion", "Delta", "KVCache", "SamplingParams", "TokenGenerator", "TokenStep", "generate", "stream"]
