"""The model zoo: one file per family, a config dataclass first.

Importing the package registers every family (`zoo` imports them all), so `MODELS` and
`get_family` are complete wherever `tgraph.models` or one of its modules is imported;
the registry itself imports no family (which would be an import circle).
"""
from .registry import MODELS, ModelFamily, get_family, make_config, register_model
from . import zoo  # noqa: E402,F401  (registers every family and its checkpoint adapter)

__all__ = ["MODELS", "ModelFamily", "get_family", "make_config", "register_model"]
