"""The ONNX exporter: model validity, versions, shapes, determinism, external data,
atomic saving and the errors users see."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import tgraph
from tgraph.codegen.onnx import DEFAULT_OPSET, LOWERINGS, SUPPORTED_OPSETS, save_onnx, to_onnx
from tgraph.codegen.onnx import export as export_mod
from tgraph.errors import ExportError
from tgraph.ir import OPS, Builder, DType, Node, TensorType


# ------------------------------------------------------------------------------ fixtures
def small_model(seed: int = 0):
    """A residual MLP followed by causal self-attention over its output: (batch, seq, 8) -> same."""
    rng = np.random.default_rng(seed)
    b = Builder()
    g = b.graph

    def param(name, *shape):
        return g.add_constant(rng.normal(size=shape).astype(np.float32) * 0.3, name, is_param=True, exact_name=True)

    x = g.add_input("x", TensorType(DType.float32, ("batch", "seq", 8)))
    w1, b1, w2 = param("mlp.fc1.weight", 8, 64), param("mlp.fc1.bias", 64), param("mlp.fc2.weight", 64, 8)
    h = b.op("Relu", b.op("Add", b.op("MatMul", x, w1), b1))
    y = b.op("Add", b.op("MatMul", h, w2), x)
    y = b.op("Sub", y, b.op("ReduceMean", y, axes=[-1]))
    scores = b.op("Mul", b.op("MatMul", y, b.op("Transpose", y, perm=[0, 2, 1])), b.const(np.float32(0.125)))
    probs = b.op("Softmax", b.op("CausalMask", scores, domain="tgraph"))
    g.outputs = [b.op("MatMul", probs, y, hint="out")]
    g.verify()
    return g


def run_kernels(graph, feeds):
    """Evaluate the graph with the op table's NumPy kernels (an oracle independent of ONNX)."""
    env = {v.name: feeds[v.name] for v in graph.inputs}
    env.update({name: v.const for name, v in graph.constants.items()})
    for node in graph.nodes:
        out = OPS[node.qualified_op].kernel(*[env[v.name] for v in node.inputs], **node.attrs)
        for value, array in zip(node.outputs, out if isinstance(out, tuple) else (out,)):
            env[value.name] = array
    return [env[v.name] for v in graph.outputs]


def ort_session(model_or_path):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def feeds_for(batch, seq, seed=1):
    return {"x": np.random.default_rng(seed).normal(size=(batch, seq, 8)).astype(np.float32)}


# ------------------------------------------------------------------------------ validity
# The onnx release that introduced each opset, and its IR version (onnx's own table).
EXPECTED_IR = {17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 12, 25: 13}


@pytest.mark.parametrize("opset", list(SUPPORTED_OPSETS))
def test_model_is_valid_and_runs_at_every_supported_opset(opset):
    g = small_model()
    model = to_onnx(g, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == EXPECTED_IR[opset] <= 13
    assert {(o.domain, o.version) for o in model.opset_import} == {("", opset)}
    sess = ort_session(model)
    for batch, seq in [(2, 5), (1, 1), (3, 7)]:
        feeds = feeds_for(batch, seq)
        (got,) = sess.run(None, feeds)
        (want,) = run_kernels(g, feeds)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_default_opset_and_unsupported_opsets():
    assert DEFAULT_OPSET == 23
    assert to_onnx(small_model()).opset_import[0].version == 23
    for bad in (16, 26, "23"):
        with pytest.raises(ExportError, match="unsupported opset"):
            to_onnx(small_model(), opset=bad)


def test_names_producer_and_initializers():
    g = small_model()
    model = to_onnx(g, model_name="tiny")
    assert model.producer_name == "tgraph" and model.producer_version == tgraph.__version__
    assert model.graph.name == "tiny" and to_onnx(g).graph.name == g.name
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == [v.name for v in g.outputs]
    inits = {t.name: t for t in model.graph.initializer}
    for name, v in g.constants.items():            # parameters by dotted name, constants too
        np.testing.assert_array_equal(numpy_helper.to_array(inits[name]), v.const)
    assert {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight"} <= set(inits)
    # Every node's output has a value_info (or is a graph output), with the IR's type.
    infos = {vi.name: vi for vi in model.graph.value_info}
    for node in g.nodes:
        for out in node.outputs:
            if out in g.outputs:
                continue
            tt = infos[out.name].type.tensor_type
            assert tt.elem_type == out.type.dtype.onnx
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            assert dims == list(out.type.shape)


def test_symbolic_and_unknown_dims():
    b = Builder()
    g = b.graph
    x = g.add_input("x", TensorType(DType.float32, ("batch", None, 4)))
    g.outputs = [b.op("Relu", x)]
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and not dims[0].HasField("dim_value")
    assert not dims[1].HasField("dim_param") and not dims[1].HasField("dim_value")
    assert dims[2].dim_value == 4
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in out_dims] == ["batch", "", ""] and out_dims[2].dim_value == 4
    (got,) = ort_session(model).run(None, {"x": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)})
    np.testing.assert_array_equal(got, np.maximum(np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4), 0))


def test_symbolic_expressions_become_dim_params():
    b = Builder()
    past = b.graph.add_input("past", TensorType(DType.float32, ("batch", "past_seq", 4)))
    new = b.graph.add_input("new", TensorType(DType.float32, ("batch", "seq", 4)))
    both = b.op("Concat", past, new, axis=1)
    b.graph.outputs = [b.op("Softmax", both)]
    assert both.type.shape == ("batch", "past_seq + seq", 4)
    model = to_onnx(b.graph)
    onnx.checker.check_model(model, full_check=True)
    (info,) = [vi for vi in model.graph.value_info if vi.name == both.name]
    assert [d.dim_param for d in info.type.tensor_type.shape.dim] == ["batch", "past_seq + seq", ""]
    rng = np.random.default_rng(0)
    feeds = {"past": rng.normal(size=(2, 3, 4)).astype(np.float32), "new": rng.normal(size=(2, 1, 4)).astype(np.float32)}
    (got,) = ort_session(model).run(None, feeds)
    np.testing.assert_allclose(got, run_kernels(b.graph, feeds)[0], rtol=1e-6, atol=1e-6)


def test_graph_inputs_and_outputs_need_a_rank():
    """onnx.checker requires a shape on graph inputs/outputs, so an unknown rank is an error."""
    b = Builder()
    r = b.graph.add_input("r", TensorType(DType.int64, None))
    b.graph.outputs = [b.op("Identity", r)]
    with pytest.raises(ExportError, match="graph input r has unknown rank"):
        to_onnx(b.graph)
    b = Builder()
    x = b.graph.add_input("x", TensorType(DType.float32, (6,)))
    target = b.graph.add_input("target", TensorType(DType.int64, (None,)))
    y = b.op("Reshape", x, target)
    b.graph.outputs = [y]
    with pytest.raises(ExportError, match=f"graph output {y.name} has unknown rank"):
        to_onnx(b.graph)


def test_constant_with_a_mismatched_type_is_refused():
    g = small_model()
    g.constants["mlp.fc1.bias"].const = np.zeros(64, np.float16)
    with pytest.raises(ExportError, match="mlp.fc1.bias"):
        to_onnx(g)


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("external", [False, True])
def test_same_graph_exports_byte_identical_files(tmp_path, external):
    a = save_onnx(small_model(), tmp_path / "a" / "model.onnx", external_data=external)
    b = save_onnx(small_model(), tmp_path / "b" / "model.onnx", external_data=external)
    assert a.read_bytes() == b.read_bytes()
    data_a, data_b = a.with_name("model.onnx.data"), b.with_name("model.onnx.data")
    assert data_a.exists() == data_b.exists() == external
    if external:
        assert data_a.read_bytes() == data_b.read_bytes()
    # Saving again over the same path gives the same bytes.
    before = a.read_bytes()
    save_onnx(small_model(), a, external_data=external)
    assert a.read_bytes() == before
    assert a.read_bytes() != save_onnx(small_model(seed=1), tmp_path / "c.onnx", external_data=external).read_bytes()


# ------------------------------------------------------------------------------ external data
def test_external_data_round_trip_through_onnxruntime(tmp_path):
    g = small_model()
    path = save_onnx(g, tmp_path / "m" / "model.onnx", external_data=True)
    assert isinstance(path, Path) and path == tmp_path / "m" / "model.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]

    shell = onnx.load(str(path), load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in shell.graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    assert set(external) == {"mlp.fc1.weight", "mlp.fc2.weight"}          # 2048 bytes each
    assert all(e["location"] == "model.onnx.data" for e in external.values())
    assert path.with_name("model.onnx.data").stat().st_size == 4096
    onnx.checker.check_model(str(path), full_check=True)

    # The data file is found relative to the model, wherever the folder goes.
    moved = path.parent.rename(tmp_path / "elsewhere") / "model.onnx"
    feeds = feeds_for(2, 6)
    (got,) = ort_session(moved).run(None, feeds)
    (want,) = ort_session(to_onnx(g)).run(None, feeds)
    np.testing.assert_array_equal(got, want)
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(moved)).graph.initializer}
    for name, v in g.parameters().items():
        np.testing.assert_array_equal(loaded[name], v.const)


def test_size_threshold_and_alignment(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "ALIGN_THRESHOLD", 2048)
    monkeypatch.setattr(export_mod, "ALIGNMENT", 4096)
    path = save_onnx(small_model(), tmp_path / "model.onnx", external_data=True, size_threshold=200)
    shell = onnx.load(str(path), load_external_data=False)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"])
               for t in shell.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert set(offsets) == {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight"}   # the bias is 256 bytes
    assert offsets["mlp.fc1.weight"] % 4096 == 0 and offsets["mlp.fc2.weight"] % 4096 == 0
    feeds = feeds_for(1, 3)
    np.testing.assert_allclose(ort_session(path).run(None, feeds)[0], run_kernels(small_model(), feeds)[0],
                               rtol=1e-5, atol=1e-5)


def test_external_data_is_automatic_for_big_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "AUTO_EXTERNAL_BYTES", 3000)   # stands in for ~1.8 GiB
    auto = save_onnx(small_model(), tmp_path / "auto.onnx")
    assert auto.with_name("auto.onnx.data").exists()
    never = save_onnx(small_model(), tmp_path / "never.onnx", external_data=False)
    assert not never.with_name("never.onnx.data").exists()
    monkeypatch.setattr(export_mod, "AUTO_EXTERNAL_BYTES", 10**6)
    small = save_onnx(small_model(), tmp_path / "small.onnx")
    assert not small.with_name("small.onnx.data").exists()


def test_saving_a_model_proto_leaves_it_unchanged(tmp_path):
    model = to_onnx(small_model())
    before = model.SerializeToString(deterministic=True)
    path = save_onnx(model, tmp_path / "model.onnx", external_data=True)
    assert model.SerializeToString(deterministic=True) == before
    assert path.with_name("model.onnx.data").exists()
    with pytest.raises(ExportError, match="stored externally"):
        save_onnx(onnx.load(str(path), load_external_data=False), tmp_path / "again.onnx")
    with pytest.raises(ExportError, match="Graph or onnx.ModelProto"):
        save_onnx("not a model", tmp_path / "x.onnx")


# ------------------------------------------------------------------------------ atomic writes
def test_failure_while_writing_data_leaves_no_files(tmp_path, monkeypatch):
    real = export_mod._externalize

    def fail_halfway(*args, **kwargs):
        real(*args, **kwargs)                        # the data is written to a temp file...
        raise OSError("disk full")                   # ...when the disk fills up

    monkeypatch.setattr(export_mod, "_externalize", fail_halfway)
    model = to_onnx(small_model())
    before = model.SerializeToString(deterministic=True)
    with pytest.raises(OSError, match="disk full"):
        save_onnx(model, tmp_path / "model.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []
    # A model passed in is left as it was, even though its tensors were mid-move.
    monkeypatch.setattr(export_mod, "_externalize", real)
    assert model.SerializeToString(deterministic=True) == before


def test_failure_on_the_final_rename_leaves_no_files(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "model.onnx":
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(export_mod.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_onnx(small_model(), tmp_path / "model.onnx", external_data=True)
    assert calls == ["model.onnx.data", "model.onnx"]
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = save_onnx(small_model(), tmp_path / "model.onnx")
    before = path.read_bytes()
    monkeypatch.setattr(export_mod, "PROTOBUF_LIMIT", 100)
    with pytest.raises(ExportError, match="external_data=True"):
        save_onnx(small_model(seed=3), path, external_data=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# ------------------------------------------------------------------------------ errors and extension
def test_unknown_op_is_an_export_error_naming_the_node():
    b = Builder()
    x = b.graph.add_input("x", TensorType(DType.float32, (2,)))
    out = b.graph.new_value(TensorType(DType.float32, (2,)), "y")
    node = b.graph.append(Node("Frobnicate", [x], [out], domain="acme", name="blk.frob"))
    b.graph.outputs = [out]
    with pytest.raises(ExportError, match=r"node blk_frob: no ONNX lowering for op 'acme.Frobnicate'"):
        to_onnx(b.graph)
    assert node.name == "blk_frob"


def test_op_without_a_rule_is_an_export_error(monkeypatch):
    monkeypatch.delitem(LOWERINGS, "Relu")
    g = small_model()
    relu = next(n for n in g.nodes if n.op == "Relu")
    with pytest.raises(ExportError, match=f"node {relu.name}: no ONNX lowering for op 'Relu'"):
        to_onnx(g)


def _gelu_graph():
    b = Builder()
    x = b.graph.add_input("x", TensorType(DType.float32, ("n",)))
    b.graph.outputs = [b.op("Relu", x, hint="act")]
    return b.graph


def _gelu(x):
    return x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_rule_needing_a_newer_opset_names_node_and_op(monkeypatch):
    """A rule emitting ONNX Gelu (opset 20) fails cleanly at opset 17 and works at 20."""
    monkeypatch.setitem(LOWERINGS, "Relu", lambda ctx, node: ctx.emit(
        "Gelu", [node.inputs[0].name], [node.outputs[0].name]))
    with pytest.raises(ExportError, match=r"node act \(Relu\): ONNX op Gelu needs opset >= 20, exporting opset 17"):
        to_onnx(_gelu_graph(), opset=17)
    model = to_onnx(_gelu_graph(), opset=20)
    onnx.checker.check_model(model, full_check=True)
    x = np.linspace(-3, 3, 13, dtype=np.float32)
    np.testing.assert_allclose(ort_session(model).run(None, {"x": x})[0], _gelu(x), rtol=1e-5, atol=1e-6)


def test_rule_may_emit_a_contrib_domain_node(monkeypatch):
    def gelu_ms(ctx, node, declare=True):
        if declare:
            ctx.use_domain("com.microsoft", 1)
        ctx.emit("Gelu", [node.inputs[0].name], [node.outputs[0].name], domain="com.microsoft")

    monkeypatch.setitem(LOWERINGS, "Relu", gelu_ms)
    model = to_onnx(_gelu_graph(), opset=17)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("com.microsoft", 1)}
    onnx.checker.check_model(model, full_check=True)
    x = np.linspace(-3, 3, 13, dtype=np.float32)
    np.testing.assert_allclose(ort_session(model).run(None, {"x": x})[0], _gelu(x), rtol=1e-5, atol=1e-6)

    monkeypatch.setitem(LOWERINGS, "Relu", lambda ctx, node: gelu_ms(ctx, node, declare=False))
    with pytest.raises(ExportError, match=r"node act \(Relu\): emits com.microsoft.Gelu without ctx.use_domain"):
        to_onnx(_gelu_graph())


def test_lowering_names_do_not_collide_with_graph_names():
    """Helper values of the CausalMask subgraph avoid names the graph already uses."""
    b = Builder()
    g = b.graph
    x = g.add_input("causalmask_tk", TensorType(DType.float32, ("q", "k")))
    g.add_constant(np.zeros(1, np.int64), "onnx_axes", exact_name=True)
    g.outputs = [b.op("CausalMask", x, domain="tgraph", hint="causalmask")]
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    produced = [o for n in model.graph.node for o in n.output]
    assert len(produced) == len(set(produced))
    names = produced + [t.name for t in model.graph.initializer] + [i.name for i in model.graph.input]
    assert len(names) == len(set(names))
    scores = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(ort_session(model).run(None, {"causalmask_tk": scores})[0],
                                  OPS["tgraph.CausalMask"].kernel(scores))
