"""The IR: tensor types, values, nodes, graphs, the op table and the builder.

Imports nothing from `tgraph.passes` or `tgraph.codegen`.
"""
from .builder import Builder, infer_node
from .core import Graph, Node, Value
from .names import NameAuthority, sanitize
from .opdefs import OPS, OpDef, get_op
from . import fused  # noqa: F401,E402  (registers the fused ops into OPS)
from . import contrib  # noqa: F401,E402  (registers onnxruntime's com.microsoft ops)
from . import opdefs_more  # noqa: F401,E402  (registers the ops tgraph reads but never emits)
from .printer import format_graph
from .types import DType, Dim, TensorType
from .verify import verify

__all__ = ["Builder", "DType", "Dim", "Graph", "Node", "NameAuthority", "OPS", "OpDef", "TensorType",
           "Value", "format_graph", "get_op", "infer_node", "sanitize", "verify"]
