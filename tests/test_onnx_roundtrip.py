"""ONNX export -> import -> export is an identity, for every op case of the op table test.

Both directions read each op's one `OnnxInterface` (tgraph.ir.opdefs): where a static
attribute of ours is an ONNX input at the target opset, and where the outputs sit. The
two exported graphs must be the same graph up to the names of intermediate values and
extra constants (the importer re-issues those), and compute the same values.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tgraph.codegen.onnx import to_onnx
from tgraph.ir import OPS
from tgraph.onnx_import import import_onnx

from test_ops import PARAMS, build, ort_run


def canonical(model: onnx.ModelProto):
    """The graph with value names replaced by structure: graph inputs and outputs keep their
    names, initializers become their contents, node outputs their (node, index) position."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    names = {vi.name: f"input:{vi.name}" for vi in g.input}

    def ref(name):
        if not name:
            return ""
        if name in names:
            return names[name]
        t = inits[name]
        a = numpy_helper.to_array(t)
        return ("const", a.dtype.str, a.shape, a.tobytes())

    nodes = []
    for i, n in enumerate(g.node):
        ins = tuple(ref(x) for x in n.input)
        for j, o in enumerate(n.output):
            if o:
                names[o] = f"output:{o}" if o in outputs else f"node{i}.{j}"
        attrs = tuple(sorted((a.name, a.SerializeToString()) for a in n.attribute))
        nodes.append((n.domain or "", n.op_type, ins, tuple(names.get(o, "") if o else "" for o in n.output), attrs))
    sig = [(vi.name, vi.type.SerializeToString()) for vi in list(g.input) + list(g.output)]
    opsets = sorted((o.domain or "", o.version) for o in model.opset_import)
    return {"signature": sig, "nodes": nodes, "opsets": opsets}


@pytest.mark.parametrize("case,opset", PARAMS)
def test_export_import_export_is_an_identity(case, opset):
    g, feeds = build(case)
    first = to_onnx(g, opset=opset)
    second = to_onnx(import_onnx(first), opset=opset)
    onnx.checker.check_model(second, full_check=True)
    a, b = canonical(first), canonical(second)
    assert a["signature"] == b["signature"]
    assert a["opsets"] == b["opsets"]
    assert [n[:2] for n in a["nodes"]] == [n[:2] for n in b["nodes"]]
    assert a["nodes"] == b["nodes"]
    assert len(first.graph.initializer) == len(second.graph.initializer)   # no leftover axes constants
    for x, y in zip(ort_run(first, feeds), ort_run(second, feeds)):
        np.testing.assert_array_equal(x, y)


def test_every_attribute_input_names_an_attribute_of_its_op():
    for key, opdef in OPS.items():
        for spec in opdef.onnx.attr_inputs:
            assert spec.attr in opdef.attrs, f"{key}: interface names unknown attribute {spec.attr!r}"
            assert spec.index >= opdef.inputs[0], f"{key}: {spec.attr} would displace a required input"


def test_a_computed_attribute_input_stays_an_input():
    """CumSum's axis computed at run time cannot become our attribute: it stays the node's
    input, the graph runs in NumPy as in onnxruntime, and an opset where ONNX had only the
    attribute form refuses it by name."""
    from onnx import TensorProto, helper

    from tgraph.errors import ExportError
    from tgraph.ir.evaluate import evaluate

    node_axis = helper.make_node("ReduceMax", ["ax"], ["axis"], keepdims=0)
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs")
    graph = helper.make_graph([node_axis, node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("ax", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    g = import_onnx(model)
    (cumsum,) = [n for n in g.nodes if n.op == "CumSum"]
    assert len(cumsum.inputs) == 2 and "axis" not in cumsum.attrs
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    feeds = {"x": x, "ax": np.array([1], np.int64)}
    np.testing.assert_array_equal(evaluate(g, feeds)["y"], np.cumsum(x, axis=1))
    np.testing.assert_array_equal(ort_run(to_onnx(g, opset=23), feeds)[0], np.cumsum(x, axis=1))
    (rm,) = [n for n in import_onnx(_reduce_mean_with_runtime_axes()).nodes]
    with pytest.raises(ExportError, match=r"axes is computed at run time, which ONNX allows from opset 18"):
        to_onnx(rm.graph, opset=17)


def _reduce_mean_with_runtime_axes():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
