"""`tgraph optimize` (and every ONNX writer) never exits 0 with a model `onnx.checker` refuses.

A model tgraph cannot write back as it is (an opset newer than it knows) is refused in one
line naming the opset, with exit 2 and no file; a written file passes the full checker, and
one that would not is refused before it is moved into place.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from tgraph.cli import main
from tgraph.codegen.onnx import save_onnx
from tgraph.errors import ExportError
from tgraph.ir import Builder, DType, TensorType


def _model(nodes, inputs, outputs, opset):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _add_model(opset):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    return _model([helper.make_node("Add", ["x", "x"], ["y"], name="add")], [x], [y], opset)


def _fp16_range_model(opset):
    """Range on float16: allowed from Range-27 on, not before."""
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, []) for n in ("start", "limit", "delta")]
    out = helper.make_tensor_value_info("r", TensorProto.FLOAT16, [None])
    return _model([helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="range")], ins, [out], opset)


def _optimize(tmp_path, capsys, model, *extra):
    src, dst = tmp_path / "in.onnx", tmp_path / "out" / "opt.onnx"
    onnx.save(model, str(src))
    code = main(["optimize", str(src), "-o", str(dst), *extra])
    _, err = capsys.readouterr()
    return code, err, dst


def _files(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_an_opset_newer_than_tgraph_knows_is_refused(tmp_path, capsys):
    code, err, dst = _optimize(tmp_path, capsys, _add_model(30))
    assert code == 2
    assert err.count("\n") == 1 and "opset 30" in err and "Traceback" not in err
    assert _files(dst.parent) == []


def test_opset_27_float16_range_is_preserved_validly_or_refused(tmp_path, capsys):
    onnx.checker.check_model(_fp16_range_model(27), full_check=True)      # a valid input
    code, err, dst = _optimize(tmp_path, capsys, _fp16_range_model(27))
    if code == 0:
        written = onnx.load(str(dst))
        onnx.checker.check_model(str(dst), full_check=True)
        assert {o.domain: o.version for o in written.opset_import}[""] >= 27
    else:
        assert code == 2 and err.count("\n") == 1 and "opset 27" in err
        assert _files(dst.parent) == []


def test_a_model_that_would_fail_the_checker_leaves_no_file(tmp_path, capsys):
    # an opset-23 file with a float16 Range is itself invalid: tgraph imports it, but must not write it back
    code, err, dst = _optimize(tmp_path, capsys, _fp16_range_model(23))
    assert code == 2, err
    assert err.count("\n") == 1 and "Range" in err and "opt.onnx" in err
    assert _files(dst.parent) == []


def test_save_onnx_checks_before_moving_into_place(tmp_path):
    b = Builder()
    start, limit, delta = (b.graph.add_input(n, TensorType(DType.float16, ())) for n in ("start", "limit", "delta"))
    b.graph.outputs = [b.op("Range", start, limit, delta, hint="r")]
    path = tmp_path / "r.onnx"
    save_onnx(_valid_graph(), path)
    before = path.read_bytes()
    with pytest.raises(ExportError, match=r"r\.onnx would not be a valid ONNX model.*Range"):
        save_onnx(b.graph, path, opset=23)
    assert path.read_bytes() == before and _files(tmp_path) == ["r.onnx"]


def _valid_graph():
    b = Builder()
    x = b.graph.add_input("x", TensorType(DType.float32, ("n",)))
    b.graph.outputs = [b.op("Relu", x, hint="y")]
    return b.graph


@pytest.mark.parametrize("source_opset", [18, 25])
def test_optimize_keeps_a_newer_opset_and_writes_valid_files(tmp_path, capsys, source_opset):
    code, err, dst = _optimize(tmp_path, capsys, _add_model(source_opset))
    assert code == 0, err
    onnx.checker.check_model(str(dst), full_check=True)
    written = {o.domain: o.version for o in onnx.load(str(dst)).opset_import}[""]
    assert written == max(23, source_opset)          # older models are raised to 23, newer ones kept
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(ReferenceEvaluator(str(dst)).run(None, {"x": x})[0], x + x)
