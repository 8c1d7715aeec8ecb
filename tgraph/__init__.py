"""tgraph: a compiler-style graph builder and exporter for Transformer models."""
__version__ = "0.1.0"

from .errors import TgraphError  # noqa: E402

__all__ = ["TgraphError", "__version__"]
