"""The NumPy backend: a graph as a standalone, readable Python module.

`generate_source(graph, weights_file)` renders the module (it imports only NumPy;
one line per node with a shape comment; op semantics from the reference kernels);
`write_numpy_module(graph, "model.py")` writes it with its ``model.npz`` weights,
atomically; `load_numpy_module(path)` imports such a file. `EMITTERS` is the per-op
table the completeness test checks against the op table.
"""
from .emitters import EMITTERS, Call, EmitContext, Inline
from .files import load_numpy_module, write_npz, write_numpy_module
from .generator import INLINE_MAX_ELEMENTS, generate_source, is_safe_identifier, plan_weights

__all__ = ["Call", "EMITTERS", "EmitContext", "INLINE_MAX_ELEMENTS", "Inline", "generate_source",
           "is_safe_identifier", "load_numpy_module", "plan_weights", "write_npz", "write_numpy_module"]
