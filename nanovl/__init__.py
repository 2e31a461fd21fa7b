"""nanovl: the Nemotron Nano VL family, natively in PyTorch."""

from nanovl.api import TextModel, load
from nanovl.errors import NanovlError

__version__ = "0.1.0"
__all__ = ["NanovlError", "TextModel", "__version__", "load"]
