"""The model zoo: one file per family, a config dataclass first."""
from .registry import MODELS, ModelFamily, get_family, make_config, register_model

__all__ = ["MODELS", "ModelFamily", "get_family", "make_config", "register_model"]
