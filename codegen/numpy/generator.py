"""`generate_source(graph, weights_file)`: a graph as a standalone NumPy module.

The module (rendered from ``templates/module.py.j2``) imports only NumPy and has one
line per node, ``name = expr  # dtype[shape]  (scope)``. Parameters and large
constants are read from the weights file and referenced as ``P["dotted.name"]``;
small constants are written inline with their dtype. Reference kernels the model
needs are copied, by source, into a namespace class ``k``.

Safety: graph values keep their names as variables only when a name is a plain
ASCII identifier that cannot shadow anything the module defines (`names.RESERVED`,
leading underscores, keywords); any other name is sanitised, and the original is
kept only inside string literals and escaped comments (see `literals`).
"""
from __future__ import annotations

import ast
import functools
import builtins
import inspect
import keyword
import textwrap
import types
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Callable, Dict, List, Tuple

import jinja2
import numpy as np

import tgraph
from tgraph.errors import ExportError
from tgraph.ir.core import Graph, Value
from tgraph.ir.names import RESERVED, sanitize
from tgraph.ir.opdefs import OPS
from tgraph.ir.types import DType, TensorType

from .emitters import EMITTERS, EmitContext
from .literals import array_lit, comment, doc, dtype_lit, str_lit

INLINE_MAX_ELEMENTS = 16     # non-parameter constants up to this size are written into the code

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
    autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
_TEMPLATES.filters.update(lit=str_lit, comment=comment, doc=doc)


def is_safe_identifier(name: str) -> bool:
    """A name usable verbatim as a local variable of `run()`."""
    return (isinstance(name, str) and name.isascii() and name.isidentifier()
            and not keyword.iskeyword(name) and not keyword.issoftkeyword(name)
            and name not in RESERVED and not name.startswith("_"))


class _Namer:
    """Variable names for graph inputs and node outputs: the graph's own where safe."""

    def __init__(self, values: List[Value]):
        self._taken = {v.name for v in values if is_safe_identifier(v.name)}
        self._names: Dict[int, str] = {}
        self._assigned: set = set()

    def name(self, v: Value) -> str:
        key = id(v)
        if key not in self._names:
            name = v.name if is_safe_identifier(v.name) and v.name not in self._assigned else None
            if name is None:
                base = sanitize(v.name)
                name, i = base, 0
                while name in self._taken:
                    i += 1
                    name = f"{base}_{i}"
                self._taken.add(name)
            self._names[key] = name
            self._assigned.add(name)
        return self._names[key]


def _dims_lit(t: TensorType) -> str:
    """The declared dims as a literal tuple (ints, symbol names, None for unknown) for run()'s checks."""
    if t.shape is None:
        return "None"
    items = [str(int(d)) if isinstance(d, int) else str_lit(d) if isinstance(d, str) else "None" for d in t.shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _type_text(t: TensorType) -> str:
    return comment(str(t))


def _needs_ml_dtypes(graph: Graph) -> bool:
    """Whether the module names a type NumPy lacks (bfloat16, float8, int4 ...): then it imports ml_dtypes."""
    if any(v.type.dtype.is_ml_dtype for v in graph.values()):
        return True
    return any(isinstance(a, DType) and a.is_ml_dtype for n in graph.nodes for a in n.attrs.values())


def _example_shape(t: TensorType) -> Tuple[int, ...]:
    return tuple(d if isinstance(d, int) else 1 for d in (t.shape or ()))


class _Kernels:
    """The reference kernels the module uses, in first-use order, as `k.<name>`.

    A kernel may call another one as ``k.other`` (the kernel modules import
    `tgraph.ir.kernels` as `k`); such dependencies are copied too. Any other global a
    kernel names, besides `np` and builtins, is refused: the copy could not run.
    """

    def __init__(self):
        self.used: Dict[str, Callable] = {}

    def use(self, fn: Callable) -> str:
        name = fn.__name__
        known = self.used.get(name)
        if known is None:
            self.used[name] = fn
            for dep in kernel_dependencies(fn):
                self.use(dep)
        elif known is not fn:
            raise ExportError(f"two different kernels are both named {name!r}")
        return f"k.{name}"

    def sources(self) -> List[str]:
        return [_kernel_source(fn) for fn in self.used.values()]


@functools.lru_cache(maxsize=None)
def _kernel_source(fn: Callable) -> str:
    """A kernel's source as a static method of the module's `k` (kernels are module-level
    functions, so their source is read once per process)."""
    try:
        src = textwrap.dedent(inspect.getsource(fn)).strip("\n")
    except (OSError, TypeError) as e:
        raise ExportError(f"cannot read the source of kernel {fn.__name__}: {e}") from None
    return textwrap.indent("@staticmethod\n" + src, "    ")


def kernel_dependencies(fn: Callable) -> List[Callable]:
    return list(_kernel_dependencies(fn))


@functools.lru_cache(maxsize=None)
def _kernel_dependencies(fn: Callable) -> tuple:
    """The kernels `fn` calls as ``k.name``; raises if it needs any other global."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError) as e:
        raise ExportError(f"cannot read the source of kernel {fn.__name__}: {e}") from None
    func = tree.body[0]
    bound = {a.arg for a in ast.walk(func) if isinstance(a, ast.arg)}
    bound |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    deps: List[Callable] = []
    for node in ast.walk(func):
        if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)) or node.id in bound:
            continue
        if node.id == "np" and fn.__globals__.get("np") is np or hasattr(builtins, node.id):
            continue
        if node.id != "k" or not isinstance(fn.__globals__.get("k"), types.ModuleType):
            raise ExportError(f"kernel {fn.__name__} uses global {node.id!r}; copied kernels may use only "
                              "np, builtins and other kernels as k.<name>")
    for node in ast.walk(func):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "k"
                and "k" not in bound):
            dep = getattr(fn.__globals__["k"], node.attr, None)
            if not inspect.isfunction(dep):
                raise ExportError(f"kernel {fn.__name__} calls k.{node.attr}, which is not a kernel function")
            deps.append(dep)
    return tuple(deps)


def _check_weights_file(weights_file: str) -> None:
    if (not isinstance(weights_file, str) or not weights_file or weights_file != weights_file.strip()
            or PurePosixPath(weights_file).is_absolute() or PureWindowsPath(weights_file).is_absolute()):
        raise ExportError(f"weights_file must be a path relative to the module's directory, got {weights_file!r}")


def plan_weights(graph: Graph) -> Dict[str, np.ndarray]:
    """The arrays the module reads from its weights file: used parameters and large constants."""
    out: Dict[str, np.ndarray] = {}
    owner: Dict[str, Value] = {}
    for v in [v for n in graph.nodes for v in n.inputs] + list(graph.outputs):
        if v is None or v.const is None or v.producer is not None:
            continue
        if not (v.is_param or v.const.size > INLINE_MAX_ELEMENTS):
            continue
        if owner.setdefault(v.name, v) is not v:
            raise ExportError(f"two different constants are both named {v.name!r}")
        out[v.name] = np.asarray(v.const, order="C")   # (ascontiguousarray would make a 0-d weight 1-d)
    return out


def generate_source(graph: Graph, weights_file: str) -> str:
    """The module's source; `weights_file` is the weights path relative to the module."""
    _check_weights_file(weights_file)
    weights = plan_weights(graph)
    namer = _Namer(list(graph.inputs) + [o for n in graph.nodes for o in n.outputs])
    kernels = _Kernels()

    def ref(v: Value) -> str:
        if v is None:
            return "None"
        if v.const is not None and v.producer is None:
            if v.name in weights:
                return f"P[{str_lit(v.name)}]"
            return array_lit(v.const)
        return namer.name(v)

    inputs = []
    for v in graph.inputs:
        inputs.append({"var": namer.name(v), "key": v.name, "dtype": dtype_lit(v.dtype), "type": _type_text(v.type),
                       "dims": _dims_lit(v.type)})

    lines = []
    for node in graph.nodes:
        emit = EMITTERS.get(node.qualified_op)
        if emit is None:
            raise ExportError(f"node {node.name!r}: the NumPy backend has no emitter for op {node.qualified_op!r}")
        ctx = EmitContext(node, [ref(v) for v in node.inputs], kernels.use)
        try:
            expr = emit(ctx)
        except ExportError as e:
            raise ExportError(f"node {node.name!r} ({node.qualified_op}): {e}") from None
        targets = ", ".join(namer.name(o) for o in node.outputs)
        opdef = OPS.get(node.qualified_op)
        if len(node.outputs) == 1 and opdef is not None and opdef.num_outputs != 1:
            targets += ","           # a one-element unpack of a multi-output kernel
        out_types = ", ".join(_type_text(o.type) for o in node.outputs)
        scope = node.meta.get("scope")
        note = f"  ({comment(scope)})" if scope else ""
        lines.append(f"{targets} = {expr}  # {out_types}{note}")

    outputs = [{"key": v.name, "ref": ref(v), "type": _type_text(v.type)} for v in graph.outputs]
    meta = [(comment(k), comment(v)[:100]) for k, v in list(graph.meta.items())[:12]
            if isinstance(v, (str, int, float, bool))]
    module = PurePath(weights_file).stem
    example = ", ".join(f"{str_lit(v.name)}: np.zeros({_example_shape(v.type)!r}, dtype={dtype_lit(v.dtype)})"
                        for v in graph.inputs)
    hist = ", ".join(f"{op} x{n}" for op, n in graph.op_histogram().items())
    return _TEMPLATES.get_template("module.py.j2").render(
        graph_name=graph.name, version=tgraph.__version__, meta=meta,
        weights_file=weights_file, n_weights=len(weights),
        n_values=int(sum(a.size for a in weights.values())), n_nodes=len(graph.nodes), histogram=hist,
        inputs=inputs, outputs=outputs, lines=lines, kernels=kernels.sources(),
        unpack="".join(f"{i['var']}, " for i in inputs).rstrip(" ") if len(inputs) == 1 else
        ", ".join(i["var"] for i in inputs),
        module=module if module.isidentifier() and module.isascii() else "model", example=example,
        ml_dtypes=_needs_ml_dtypes(graph),
        weight_views=[(str_lit(name), dtype_lit(a.dtype)) for name, a in weights.items()
                      if DType.of(a.dtype).is_ml_dtype],
    )
