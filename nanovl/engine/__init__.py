"""The generation engine: token ids in, token ids (and text deltas) out. Knows nothing of HTTP."""

from nanovl.engine.generate import Completion, Delta, TokenGenerator, generate, stream
from nanovl.engine.sampling import SamplingParams
from nanovl.models.cache import KVCache

__all__ = ["Completion", "Delta", "KVCache", "SamplingParams", "TokenGenerator", "generate", "stream"]
