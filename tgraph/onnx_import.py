"""`import_onnx`: an ONNX model (from any exporter) as a tgraph `Graph`.

Why: the fusion passes must work on graphs tgraph did not write itself (PyTorch's
exporters, Hugging Face models), and `tgraph optimize` needs a way in.

Standard-domain (and onnxruntime contrib) ops of our op table map one to one, through
the op's `OnnxInterface` in the op table, the same description the ONNX lowering reads:
static parameters that ONNX moved to inputs over the opsets (Reduce* axes,
Squeeze/Unsqueeze axes, Split sizes, CumSum's axis) become our attributes, so they must
be constants; the constants read that way are not kept as weights. `Constant` nodes and initializers become
graph constants (initializers are parameters and keep their names). Value names are
arbitrary strings in ONNX: intermediate ones are re-issued by the graph's
`NameAuthority` (legal identifiers); graph input and output names are the model's
interface and are kept exactly. Types are re-inferred by the `Builder`, so a model
our shape rules disagree with fails at the node that shows it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .codegen.onnx.export import SUPPORTED_OPSETS
from .errors import TgraphError
from .ir import Builder, DType, Graph, TensorType, Value
from .ir.opdefs import OPS
from .ir.opdefs_more import runtime_attr_input

MIN_OPSET = 13


# ops onnxruntime registers in the ONNX domain though ONNX has no such op (its own graphs,
# e.g. onnxruntime-genai's, carry them), read as the standard op with the same meaning
_ORT_IN_ONNX_DOMAIN = {"SimplifiedLayerNormalization": "RMSNormalization"}   # RMSNorm, same attributes

# attributes that hold an element type (a TensorProto enum number), read as DTypes
_DTYPE_ATTRS = {"Cast": ("to",), "EyeLike": ("dtype",), "QuantizeLinear": ("output_dtype",),
                "DequantizeLinear": ("output_dtype",)}


class OnnxImportError(TgraphError):
    """An ONNX model that tgraph cannot import (unsupported op or domain, computed axes, old opset)."""

# tgraph's own domain: its ops are lowered to standard subgraphs, never written as such
_INTERNAL_DOMAIN = "tgraph"


def _importable_domains() -> set:
    """The domains of the op table, but tgraph's own (lowered to subgraphs, never written)."""
    return {k.rpartition(".")[0] for k in OPS} - {_INTERNAL_DOMAIN}


def read_onnx_proto(path, error=None, load_external_data: bool = False) -> "onnx.ModelProto":
    """An ONNX file's ModelProto, or one-line `error` (default OnnxImportError) naming the file:
    missing, empty (protobuf reads 0 bytes as an empty model), unreadable, or without a graph."""
    import onnx

    error = error or OnnxImportError
    path = Path(os.fspath(path))
    if not path.is_file():
        raise error(f"ONNX file not found: {path}")
    if path.stat().st_size == 0:
        raise error(f"{path} is empty (0 bytes), not an ONNX model")
    try:
        # external data (weights in a sibling file) is resolved relative to the model's folder
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:
        raise error(f"cannot read ONNX file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    ) from None
    if not model.HasField("graph"):
        raise error(f"{path} is not an ONNX model (it has no graph)")
    return model


def _load(model_or_path) -> "onnx.ModelProto":
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return read_onnx_proto(model_or_path, load_external_data=True)


def _type_of(vi, what: str) -> TensorType:
    t = vi.type
    if not t.HasField("tensor_type"):
        raise OnnxImportError(f"graph {what} {vi.name!r} is not a tensor")
    tt = t.tensor_type
    try:
        dtype = DType(tt.elem_type)
    except ValueError:
        raise OnnxImportError(f"graph {what} {vi.name!r} has unsupported element type {tt.elem_type}") from None
    if not tt.HasField("shape"):
        return TensorType(dtype, None)
    dims: List[Any] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorType(dtype, tuple(dims))


def _array(tensor, where: str) -> np.ndarray:
    from onnx import numpy_helper

    try:
        DType(tensor.data_type)
    except ValueError:
        raise OnnxImportError(f"{where}: unsupported tensor element type {tensor.data_type}") from None
    try:
        return np.asarray(numpy_helper.to_array(tensor))
    except (ValueError, TypeError, IndexError) as e:   # e.g. dims whose product is not the data's length
        raise OnnxImportError(f"{where}: dims {list(tensor.dims)} do not match its data "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _constant_value(node) -> np.ndarray:
    from onnx import helper

    where = f"node {node.name or node.output[0]!r} (Constant)"
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if a.name == "value":
            return _array(v, where)
        if a.name == "value_float":
            return np.array(v, np.float32)
        if a.name == "value_floats":
            return np.array(v, np.float32)
        if a.name == "value_int":
            return np.array(v, np.int64)
        if a.name == "value_ints":
            return np.array(v, np.int64)
    raise OnnxImportError(f"{where}: unsupported constant form "
                          f"({', '.join(a.name for a in node.attribute) or 'no value'})")


def _attrs(node) -> Dict[str, Any]:
    from onnx import AttributeProto, helper

    out: Dict[str, Any] = {}
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH or a.type == AttributeProto.GRAPHS:
            raise OnnxImportError(f"node {node.name!r} ({node.op_type}): subgraph attributes are not supported")
        v = helper.get_attribute_value(a)
        if a.type == AttributeProto.TENSOR:
            v = _array(v, f"node {node.name!r}")
        elif isinstance(v, bytes):
            v = v.decode()
        elif a.type in (AttributeProto.INTS, AttributeProto.FLOATS):
            v = list(v)
        out[a.name] = v
    return out


def _layer_norm_statistics(b: Builder, ins, attrs, hint: str) -> tuple:
    """LayerNormalization's Mean and InvStdDev outputs (for training; the IR op keeps only Y):
    the ReduceMean subgraph that computes them, in the stash type (float32 unless stash_type=0)."""
    x = ins[0]
    rank = x.type.rank
    if rank is None:
        raise TgraphError("Mean/InvStdDev outputs need the input's rank")
    axes = list(range(attrs.get("axis", -1) % rank, rank))
    if attrs.get("stash_type", 1) == 1 and x.dtype is not DType.float32:
        x = b.op("Cast", x, to=DType.float32, hint=f"{hint}_stash")
    mean = b.op("ReduceMean", x, axes=axes, keepdims=1, hint=f"{hint}_mean")
    d = b.op("Sub", x, mean, hint=f"{hint}_centered")
    var = b.op("ReduceMean", b.op("Mul", d, d, hint=f"{hint}_square"), axes=axes, keepdims=1, hint=f"{hint}_var")
    eps = b.const(np.array(attrs.get("epsilon", 1e-5), dtype=x.dtype.numpy), hint=f"{hint}_epsilon")
    std = b.op("Sqrt", b.op("Add", var, eps, hint=f"{hint}_var_eps"), hint=f"{hint}_std")
    return mean, b.op("Reciprocal", std, hint=f"{hint}_inv_std")


# ops whose ONNX form has outputs the IR op does not keep, and how to compute them beside it
_STATISTICS = {"LayerNormalization": _layer_norm_statistics}


def _allows(schema, index: int, dtype: DType) -> bool:
    """Whether `schema` allows element type `dtype` as input `index`."""
    import onnx

    if not schema.inputs:
        return True
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]     # (a variadic last input repeats)
    allowed = {t.type_param_str: set(t.allowed_type_strs) for t in schema.type_constraints}.get(formal.type_str)
    if allowed is None:                                             # a fixed type, e.g. tensor(int64)
        allowed = {formal.type_str}
    name = onnx.helper.tensor_dtype_to_string(dtype.onnx).replace("TensorProto.", "").lower()  # float, double ...
    return f"tensor({name})" in allowed


def _widens(newer, older, node) -> bool:
    """Whether schema `newer` is `older` with more element types and attributes the node does not set."""
    def io(schema):
        return ([(i.name, i.option) for i in schema.inputs], [(o.name, o.option) for o in schema.outputs])

    if io(newer) != io(older):
        return False
    added = set(newer.attributes) - set(older.attributes)
    if any(a.name in added for a in node.attribute):
        return False
    return all(newer.attributes[k].default_value == older.attributes[k].default_value for k in older.attributes
               if k in newer.attributes)


class _Importer:
    def __init__(self, model):
        self.model = model
        self.graph = Graph(name=model.graph.name or "main")
        self.b = Builder(self.graph)
        self.env: Dict[str, Value] = {}
        self.output_names = {o.name for o in model.graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        self.read_as_attrs: set = set()         # constants that became attributes

    # ---- helpers ------------------------------------------------------------------------
    def where(self, node) -> str:
        return f"node {node.name or (node.output[0] if node.output else '?')!r} ({node.op_type})"

    def known_input(self, node, i: int) -> Optional[np.ndarray]:
        """Input `i` when its contents are known before run time: a constant, or integers that
        follow from static shapes (Shape -> Gather -> Concat chains, as function bodies compute axes)."""
        v = self.env[node.input[i]]
        if v.const is not None:
            return np.asarray(v.const)
        if v.sym is not None and all(isinstance(d, int) for d in v.sym):
            return np.array(v.sym, dtype=np.int64).reshape(v.type.shape if v.type.is_static else (-1,))
        return None

    def const_input(self, node, i: int, what: str) -> Optional[np.ndarray]:
        """Input `i` as a constant array (None when absent); refuses computed values."""
        if i >= len(node.input) or not node.input[i]:
            return None
        v = self.env[node.input[i]]
        if v.const is None:
            raise OnnxImportError(f"{self.where(node)}: {what} (input {i}, {node.input[i]!r}) must be a constant; "
                                  "tgraph keeps it as an attribute")
        return v.const

    # ---- the import -------------------------------------------------------------------------
    def run(self) -> Graph:
        g, mg = self.graph, self.model.graph
        newest = max(SUPPORTED_OPSETS)       # ops may have changed since: tgraph could not write it back as it is
        if self.opset is None:
            raise OnnxImportError("model imports no opset of the standard domain")
        self.model_opset = self.opset
        import onnx

        if self.opset > onnx.defs.onnx_opset_version():
            raise OnnxImportError(f"model uses opset {self.opset} of the standard domain, newer than this onnx "
                                  f"({onnx.__version__}) knows ({onnx.defs.onnx_opset_version()}); tgraph imports "
                                  f"opsets up to that and writes {MIN_OPSET}..{newest}")
        # a model of another opset is read at the nearest one tgraph knows, node by node
        # when each node's op means the same there (`_check_version`)
        self.opset = min(max(self.opset, MIN_OPSET), newest)
        g.meta["onnx_opset"] = self.opset
        out_names = [o.name for o in mg.output]
        init_names = {t.name for t in mg.initializer}
        for vi in mg.input:                      # interface names are kept exactly
            if vi.name in init_names:
                continue                          # an input with a default: the initializer wins, as in ORT
            self.env[vi.name] = g.add_input(vi.name, _type_of(vi, "input"))
        for name in out_names:
            if name not in self.env and name not in init_names:
                g.names.claim(name)              # reserved now, given to the producing value later
        for t in mg.initializer:
            self.env[t.name] = g.add_constant(_array(t, f"initializer {t.name!r}"), hint=t.name, is_param=True,
                                              exact_name=True)
        for node in mg.node:
            self.node(node)
        for name in self.read_as_attrs:          # an axes constant is not a weight of the model
            v = self.env[name]
            if not v.uses and name not in out_names and g.constants.get(v.name) is v:
                del g.constants[v.name]
                g.names.release(v.name)
        for vi in mg.output:
            if vi.name not in self.env:
                raise OnnxImportError(f"graph output {vi.name!r} is not produced by any node")
            v = self.env[vi.name]
            declared = _type_of(vi, "output")
            if v.producer is not None and declared.shape is not None and (
                    v.type.shape is None or len(v.type.shape) == len(declared.shape)):
                # keep what we inferred, filling unknown dims from the declaration
                inferred = v.type.shape or (None,) * len(declared.shape)
                dims = tuple(i if i is not None else d for i, d in zip(inferred, declared.shape))
                v.type = TensorType(v.type.dtype, dims)
            g.outputs.append(v)
        g.verify()
        return g

    def node(self, node) -> None:
        domain = "" if node.domain == "ai.onnx" else node.domain
        op = node.op_type
        if domain == "" and op in _ORT_IN_ONNX_DOMAIN:
            op = _ORT_IN_ONNX_DOMAIN[op]
        key = f"{domain}.{op}" if domain else op
        if domain == "" and op == "Constant":
            arr = _constant_value(node)
            name = node.output[0]
            if name in self.output_names and name not in self.env:    # a graph output keeps its name
                self.graph.names.release(name)
                self.env[name] = self.graph.add_constant(arr, hint=name, exact_name=True)
            else:
                self.env[name] = self.graph.add_constant(arr, hint=name)
            return
        if domain not in _importable_domains():
            raise OnnxImportError(f"{self.where(node)}: domain {node.domain!r} is not supported")
        if domain == "" and self.model_opset != self.opset:
            self._check_version(node)
        if key not in OPS:
            raise OnnxImportError(f"{self.where(node)}: op {key} is not supported by tgraph")
        opdef = OPS[key]
        for name in node.input:
            if name and name not in self.env:
                raise OnnxImportError(f"{self.where(node)}: input {name!r} is not defined before use")
        attrs = _attrs(node)
        interface = opdef.onnx
        from_inputs = interface.as_inputs(self.opset) if domain == "" else interface.attr_inputs
        runtime = set()
        for spec in from_inputs:                 # static parameters ONNX passes as inputs
            if spec.index < len(node.input) and node.input[spec.index]:
                array = self.known_input(node, spec.index)
                if array is None and runtime_attr_input(opdef, spec):
                    runtime.add(spec.index)      # computed at run time: it stays an input
                    continue
                array = self.const_input(node, spec.index, spec.attr) if array is None else array
                try:
                    attrs[spec.attr] = spec.from_array(array, self.where(node))
                except TgraphError as e:
                    raise OnnxImportError(str(e)) from None
                self.read_as_attrs.add(node.input[spec.index])
        positions = {spec.index for spec in from_inputs} - runtime
        input_names = [n for i, n in enumerate(node.input) if i not in positions]
        std = domain == ""
        if std and op.startswith("Reduce") and not runtime:
            noop = attrs.pop("noop_with_empty_axes", 0)
            if attrs.get("axes") is not None and len(attrs["axes"]) == 0 and not noop:
                attrs["axes"] = None            # ONNX: empty axes reduce everything
            elif attrs.get("axes") is None and noop:
                attrs["axes"] = []              # ours: empty axes reduce nothing
        if std and op == "Split":
            if attrs.get("split") is None and attrs.get("num_outputs") is None:
                attrs["num_outputs"] = len(node.output)
        for name in _DTYPE_ATTRS.get(op, ()) if std else ():
            if attrs.get(name):                  # an element type number (0: unset)
                attrs[name] = self._dtype(node, attrs[name])
            elif name in attrs:
                del attrs[name]
        if std and op == "Attention":
            # one output, or all four: the present outputs or qk_matmul_output ask for the rest
            wants_more = any(node.output[1:]) if len(node.output) > 1 else False
            if len(node.output) < 4 or not node.output[3]:
                attrs.pop("qk_matmul_output_mode", None)     # it shapes only that output
            if wants_more and attrs.get("qk_matmul_output_mode") is None and \
                    not (len(node.input) > 4 and node.input[4]):
                attrs["qk_matmul_output_mode"] = 0
        ins = [self.env[n] if n else None for n in input_names]
        while ins and ins[-1] is None:
            ins.pop()
        try:
            output_names = interface.ir_outputs(list(node.output), self.where(node))
        except TgraphError as e:
            raise OnnxImportError(str(e)) from None
        unknown = set(attrs) - set(opdef.attrs)
        if unknown:
            self._fail(node, f"attribute(s) {sorted(unknown)} are not supported")
        self.b.scope = _scope_of(node.name)
        hint = node.output[0] if node.output and node.output[0] else op.lower()
        try:
            outs = self.b.op(op, *ins, hint=hint, domain=domain, **attrs)
        except TgraphError as e:
            raise OnnxImportError(f"{self.where(node)}: {e}") from None
        outs = outs if isinstance(outs, tuple) else (outs,)
        extra = _STATISTICS.get(key) if len(output_names) > len(outs) and any(output_names[len(outs):]) else None
        if extra is not None:                    # training outputs, computed beside the op
            try:
                outs = outs + extra(self.b, ins, opdef.resolve_attrs(attrs), hint)
            except TgraphError as e:
                raise OnnxImportError(f"{self.where(node)}: {e}") from None
        if len(output_names) < len(outs):
            output_names = output_names + [""] * (len(outs) - len(output_names))   # optional outputs left out
        if len(outs) != len(output_names):
            self._fail(node, f"has {len(output_names)} outputs, tgraph's {op} gives {len(outs)}")
        for name, v in zip(output_names, outs):
            if not name:
                continue
            if name in self.env:
                self._fail(node, f"output {name!r} is assigned twice")
            if name in self.output_names:
                self.graph.names.release(v.name)  # the reserved interface name replaces the fresh one
                v.name = name
            self.env[name] = v

    def _check_version(self, node) -> None:
        """A node of a model whose opset tgraph does not write is read at `self.opset` when its
        op has the same definition there, or (for a newer opset) one that differs only in
        allowing more element types or in attributes the node leaves unset."""
        import onnx

        op, model = node.op_type, self.model_opset
        try:
            theirs = onnx.defs.get_schema(op, model, "")
        except onnx.defs.SchemaError:
            self._fail(node, f"{op} is not an ONNX operator at opset {model}")
        try:
            ours = onnx.defs.get_schema(op, self.opset, "")
        except onnx.defs.SchemaError:
            self._fail(node, f"{op}-{theirs.since_version} is newer than opset {self.opset}, the newest tgraph writes")
        if theirs.since_version == ours.since_version:
            return
        if model > self.opset and _widens(theirs, ours, node):
            for i, name in enumerate(node.input):   # ... and the node uses only types the older one allows
                if name and not _allows(ours, i, self.env[name].dtype):
                    self._fail(node, f"{op}-{theirs.since_version} (opset {model}) takes {self.env[name].dtype.name} "
                                     f"as input {i}, which {op}-{ours.since_version} (opset {self.opset}, the "
                                     f"newest tgraph writes) does not")
            return
        self._fail(node, f"{op}-{theirs.since_version} (opset {model}) differs from {op}-{ours.since_version}, "
                         f"the version tgraph reads at opset {self.opset} (convert it with onnx.version_converter)")

    def _dtype(self, node, number) -> DType:
        try:
            return DType(number)
        except ValueError:
            self._fail(node, f"element type {number} is not supported")

    def _fail(self, node, why: str):
        raise OnnxImportError(f"{self.where(node)}: {why}")


def _scope_of(node_name: str) -> List[str]:
    """The module path in a torch.onnx node name (``/h.0/attn/MatMul_1`` -> ``["h.0", "attn"]``),
    kept as the node's scope so pictures and errors group imported nodes by module."""
    parts = [p for p in (node_name or "").split("/")[:-1] if p]
    return parts if (node_name or "").startswith("/") else []


def import_onnx(model_or_path: Union[str, os.PathLike, "onnx.ModelProto"]) -> Graph:
    """Import an ONNX model (a path, with external data, or a ModelProto) as a verified `Graph`."""
    from .progress import phase

    with phase("import"):
        return _Importer(_load(model_or_path)).run()
