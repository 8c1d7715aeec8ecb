"""The exception hierarchy: every error a user can cause is a `TgraphError`.

The CLI prints `TgraphError`s as one line and exits non-zero; anything else is a
bug in tgraph and is reported as such.
"""


class TgraphError(Exception):
    """Base class for errors caused by user input (models, configs, files)."""


class ShapeError(TgraphError):
    """Shape or dtype inference failed while building a graph."""


class VerifyError(TgraphError):
    """The IR broke one of its invariants (a pass or builder bug, or a hand-built graph)."""


class ConfigError(TgraphError):
    """A model configuration that cannot work, or an unknown option."""


class CheckpointError(TgraphError):
    """A checkpoint is missing, corrupt, unsupported or does not match the model."""


class ExportError(TgraphError):
    """A graph cannot be lowered to the requested backend or opset."""


class RuntimeBackendError(TgraphError):
    """The requested runtime (e.g. the CUDA execution provider) is not usable."""


class InputError(TgraphError):
    """Inputs given to a model do not match its signature (names, dtype, rank, dims)."""


class TgraphWarning(UserWarning):
    """Something a user needs to know that does not stop the command (NaN weights in a checkpoint ...).

    Raised through the `warnings` module; the CLI prints each as one line, `tgraph: warning: ...`.
    """
class ResourceError(TgraphError):
    """Not enough memory or disk for the step asked for (said up front, or caught as it happens)."""
