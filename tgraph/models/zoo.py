"""Imports every model family so that each registers itself."""
from . import transformer  # noqa: F401
from . import gpt, gpt2, gpt_neo  # noqa: F401
from . import llama, palm  # noqa: F401
from . import t5  # noqa: F401
from . import bart  # noqa: F401
from . import albert, bert  # noqa: F401
from . import xlnet  # noqa: F401
