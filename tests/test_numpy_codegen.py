"""The NumPy backend: every op against its kernel and onnx.reference, readability, safety, files."""
from __future__ import annotations

import ast
import os

import numpy as np
import pytest

from tgraph.errors import ExportError
from tgraph.ir import OPS, Builder, DType, Graph, Node, TensorType, Value
from tgraph.ir.names import RESERVED
from tgraph.codegen.numpy import (EMITTERS, INLINE_MAX_ELEMENTS, generate_source, load_numpy_module,
                                  write_numpy_module)

rng = np.random.default_rng(0)


def f32(*shape, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


class In:
    """Marks an op input that is fed at run time (a graph input); bare arrays become constants."""

    def __init__(self, array):
        self.array = np.asarray(array)


def param(array):
    """A constant stored as a parameter (goes to the weights file)."""
    return ("param", np.asarray(array))


def _nbits(K, N, bits, block):
    """B, scales and zero points of a random [K, N] weight, as MatMulNBits stores them."""
    from tgraph.passes.quantize import matmul_nbits_inputs, quantize_weight

    return matmul_nbits_inputs(quantize_weight(f32(K, N), bits, block))


# (case id, op, inputs, attrs); inputs: In(array) = graph input, param(array), or a plain constant array.
CASES = [
    ("add", "Add", [In(f32(2, 3, 4)), In(f32(4))], {}),
    ("add_int", "Add", [In(i64(1, -2, 3)), i64(5, 6, 7)], {}),
    ("sub", "Sub", [In(f32(2, 3)), np.float32(0.5)], {}),
    ("mul", "Mul", [In(f32(2, 3)), param(f32(3))], {}),
    ("div", "Div", [In(f32(2, 3)), In(f32(2, 3, lo=0.5, hi=2.0))], {}),
    ("div_int_truncates", "Div", [In(i64(-7, 7, -7, 7, 0, -1)), In(i64(2, 2, -2, -2, 3, 3))], {}),
    ("pow", "Pow", [In(f32(2, 3, lo=0.1)), np.float32(3.0)], {}),
    ("pow_int", "Pow", [In(i64(2, 3, -4)), i64(3, 2, 3)], {}),
    ("matmul", "MatMul", [In(f32(2, 3, 4)), param(f32(4, 5))], {}),
    ("matmul_vec", "MatMul", [In(f32(4)), In(f32(2, 4, 3))], {}),
    ("gemm", "Gemm", [In(f32(3, 4)), param(f32(5, 4)), param(f32(5))], {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("gemm_no_c", "Gemm", [In(f32(4, 3)), In(f32(4, 5))], {"transA": 1}),
    ("sqrt", "Sqrt", [In(f32(3, 4, lo=0.0))], {}),
    ("reciprocal", "Reciprocal", [In(f32(3, 4, lo=0.5))], {}),
    ("neg", "Neg", [In(f32(3, 4))], {}),
    ("neg_int", "Neg", [In(i64(1, -2, 0))], {}),
    ("exp", "Exp", [In(f32(3, 4))], {}),
    ("log", "Log", [In(f32(3, 4, lo=0.1))], {}),
    ("erf", "Erf", [In(f32(3, 4, lo=-3, hi=3))], {}),
    ("tanh", "Tanh", [In(f32(3, 4))], {}),
    ("sigmoid", "Sigmoid", [In(f32(3, 4, lo=-8, hi=8))], {}),
    ("relu", "Relu", [In(f32(3, 4))], {}),
    ("relu_int", "Relu", [In(i64(-3, 0, 4))], {}),
    ("cos", "Cos", [In(f32(3, 4))], {}),
    ("sin", "Sin", [In(f32(3, 4))], {}),
    ("identity", "Identity", [In(f32(3, 4))], {}),
    ("not", "Not", [In(np.array([True, False, True]))], {}),
    ("and", "And", [In(np.array([True, False, True])), np.array([True, True, False])], {}),
    ("or", "Or", [In(np.array([True, False, False])), In(np.array([False, False, True]))], {}),
    ("equal", "Equal", [In(i64(1, 2, 3)), i64(1, 0, 3)], {}),
    ("less", "Less", [In(f32(2, 3)), In(f32(3))], {}),
    ("greater", "Greater", [In(f32(2, 3)), np.float32(0.0)], {}),
    ("softmax", "Softmax", [In(f32(2, 3, 4))], {"axis": 1}),
    ("reduce_mean", "ReduceMean", [In(f32(2, 3, 4))], {"axes": [-1], "keepdims": 1}),
    ("reduce_sum", "ReduceSum", [In(f32(2, 3, 4))], {"axes": [0, 2], "keepdims": 0}),
    ("reduce_max_all", "ReduceMax", [In(f32(2, 3, 4))], {"keepdims": 0}),
    ("transpose", "Transpose", [In(f32(2, 3, 4, 5))], {"perm": [0, 2, 1, 3]}),
    ("transpose_default", "Transpose", [In(f32(2, 3, 4))], {}),
    ("reshape_copy_dim", "Reshape", [In(f32(2, 3, 4)), i64(0, -1)], {}),
    ("reshape_static", "Reshape", [In(f32(2, 3, 4)), i64(4, -1, 2)], {}),
    ("reshape_dynamic", "Reshape", [In(f32(2, 3, 4)), In(i64(6, 4))], {}),
    ("squeeze", "Squeeze", [In(f32(2, 1, 3, 1))], {"axes": [1]}),
    ("squeeze_all", "Squeeze", [In(f32(2, 1, 3, 1))], {}),
    ("unsqueeze", "Unsqueeze", [In(f32(2, 3))], {"axes": [0, -1]}),
    ("expand", "Expand", [In(f32(3, 1)), i64(2, 1, 4)], {}),
    ("concat", "Concat", [In(f32(2, 1)), In(f32(2, 3)), param(f32(2, 2))], {"axis": 1}),
    ("split_sizes", "Split", [In(f32(2, 3, 4))], {"axis": 1, "split": [1, 2]}),
    ("split_num", "Split", [In(f32(2, 6))], {"axis": -1, "num_outputs": 2}),
    ("split_one", "Split", [In(f32(2, 6))], {"axis": 0, "split": [2]}),
    ("slice", "Slice", [In(f32(4, 5, 6)), i64(1, -4), i64(2**63 - 1, 5), i64(-1, 1)], {}),
    ("slice_steps", "Slice", [In(f32(6, 5)), i64(0, 4), i64(6, 0), i64(0, 1), i64(2, -1)], {}),
    ("slice_dynamic", "Slice", [In(f32(6, 5)), In(i64(1)), In(i64(-1))], {}),
    ("gather", "Gather", [param(f32(10, 4)), In(np.array([[1, -1], [0, 9]], dtype=np.int64))], {}),
    ("gather_axis_int32", "Gather", [In(f32(3, 5)), np.array([4, 0], dtype=np.int32)], {"axis": 1}),
    ("gather_elements", "GatherElements", [In(f32(3, 4)), np.array([[0, 3], [2, -1], [1, 1]], np.int64)],
     {"axis": 1}),
    ("flatten", "Flatten", [In(f32(2, 3, 4))], {"axis": 2}),
    ("gather_nd", "GatherND", [In(f32(2, 3, 4)), np.array([[[1], [0]], [[2], [2]]], np.int64)], {"batch_dims": 1}),
    ("max", "Max", [In(i64(1, 5, 3)), In(i64(2, 5, 1)), i64(0, 7, 0)], {}),
    ("less_or_equal", "LessOrEqual", [In(i64(1, 5, 3)), i64(2, 5, 1)], {}),
    ("greater_or_equal", "GreaterOrEqual", [In(f32(2, 3)), np.float32(0.0)], {}),
    ("isnan", "IsNaN", [In(np.array([1.0, np.nan, -np.inf], np.float32))], {}),
    ("where", "Where", [In(np.array([[True, False, True]])), In(f32(2, 3)), np.float32(-1.0)], {}),
    ("cast_to_int", "Cast", [In(np.array([-2.7, -0.5, 0.5, 3.9], np.float32))], {"to": DType.int64}),
    ("cast_to_half", "Cast", [In(f32(3, 4))], {"to": DType.float16}),
    ("cast_to_bool", "Cast", [In(i64(0, 3, -1))], {"to": DType.bool}),
    ("trilu_lower_k", "Trilu", [In(f32(2, 4, 5)), np.array(1, dtype=np.int64)], {"upper": 0}),
    ("trilu_upper", "Trilu", [In(f32(4, 4))], {}),
    ("shape", "Shape", [In(f32(2, 3, 4))], {"start": 1}),
    ("constant_of_shape", "ConstantOfShape", [i64(2, 3)], {"value": np.array([1.5], np.float32)}),
    ("constant_of_shape_int", "ConstantOfShape", [In(i64(3, 1))], {"value": np.array([7], np.int64)}),
    ("range", "Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)], {}),
    ("range_float", "Range", [np.array(0.5, np.float32), In(np.array(2.0, np.float32)),
                              np.array(0.25, np.float32)], {}),
    ("causal_mask", "CausalMask", [In(f32(2, 3, 5))], {}),
    ("causal_mask_window", "CausalMask", [In(f32(2, 6, 8))], {"window": 3}),
    ("cumsum_int", "CumSum", [In(i64(1, 0, 1, 1, 0, 1).reshape(2, 3))], {"axis": 1}),
    ("cumsum_exclusive_reverse", "CumSum", [In(f32(2, 3, 4))], {"axis": -1, "exclusive": 1, "reverse": 1}),
    ("layer_norm", "LayerNormalization", [In(f32(2, 3, 8)), param(f32(8)), param(f32(8))], {"epsilon": 1e-6}),
    ("layer_norm_no_bias", "LayerNormalization", [In(f32(2, 3, 8)), param(f32(8))], {}),
    ("rms_norm", "RMSNormalization", [In(f32(2, 3, 8)), param(f32(8))], {}),
    ("gelu", "Gelu", [In(f32(3, 4, lo=-4, hi=4))], {}),
    ("gelu_tanh", "Gelu", [In(f32(3, 4, lo=-4, hi=4))], {"approximate": "tanh"}),
    ("attention", "Attention", [In(f32(2, 4, 3, 8)), In(f32(2, 4, 5, 8)), In(f32(2, 4, 5, 8))], {}),
    ("attention_causal_gqa", "Attention", [In(f32(2, 4, 5, 8)), In(f32(2, 2, 5, 8)), In(f32(2, 2, 5, 8))],
     {"is_causal": 1, "scale": 0.25}),
    ("attention_bool_mask", "Attention", [In(f32(1, 2, 3, 4)), In(f32(1, 2, 5, 4)), In(f32(1, 2, 5, 4)),
                                          In(np.array([[True, True, False, True, True]]))], {}),
    ("attention_float_mask", "Attention", [In(f32(1, 2, 3, 4)), In(f32(1, 2, 5, 4)), In(f32(1, 2, 5, 4)),
                                           In(f32(3, 5))], {}),
    ("rotary_position_ids", "RotaryEmbedding", [In(f32(2, 3, 5, 8)), f32(7, 4), f32(7, 4),
                                                In(np.array([[0, 1, 2, 3, 4], [6, 5, 0, 2, 2]]))], {}),
    ("rotary_partial_interleaved", "RotaryEmbedding", [In(f32(2, 5, 12)), In(f32(2, 5, 2)), In(f32(2, 5, 2))],
     {"rotary_embedding_dim": 4, "interleaved": 1, "num_heads": 2}),
    # onnxruntime contrib ops (domain com.microsoft): checked against onnxruntime, not onnx.reference
    ("skip_layer_norm", "com.microsoft.SkipLayerNormalization",
     [In(f32(2, 3, 8)), In(f32(2, 3, 8)), param(f32(8)), param(f32(8)), param(f32(8))], {"epsilon": 1e-5}),
    ("skip_layer_norm_bias_only", "com.microsoft.SkipLayerNormalization",
     [In(f32(3, 8)), In(f32(3, 8)), param(f32(8)), None, param(f32(8))], {"epsilon": 1e-6}),
    ("skip_rms_norm", "com.microsoft.SkipSimplifiedLayerNormalization",
     [In(f32(2, 3, 8)), In(f32(2, 3, 8)), param(f32(8))], {"epsilon": 1e-6}),
    ("group_query_attention_decode_rotary", "com.microsoft.GroupQueryAttention",
     [In(f32(2, 1, 64)), In(f32(2, 1, 32)), In(f32(2, 1, 32)), In(f32(2, 2, 5, 16)), In(f32(2, 2, 5, 16)),
      In(np.array([4, 4], np.int32)), In(np.array(5, np.int32)), f32(8, 8), f32(8, 8)],
     {"num_heads": 4, "kv_num_heads": 2, "do_rotary": 1}),
    ("matmul_nbits_int4", "com.microsoft.MatMulNBits",
     [In(f32(2, 3, 48))] + [param(a) for a in _nbits(48, 8, 4, 32)], {"K": 48, "N": 8, "bits": 4, "block_size": 32}),
]


def onnx_default_opset() -> int:
    from tgraph.codegen.onnx import DEFAULT_OPSET

    return DEFAULT_OPSET


def _from_op_table_cases():
    """The op-table cases (tests/test_ops.py) of the ops this file has no case of: the ops tgraph
    reads from other tools' graphs (their constant inputs stay constants)."""
    from test_ops import CASES as OP_CASES

    covered = {c[1] for c in CASES} | {"tgraph.CausalMask"}
    return [(f"op-{c.id}", c.op, [a if a is None or i in c.const else In(a) for i, a in enumerate(c.inputs)],
             dict(c.attrs), max(c.opsets)) for c in OP_CASES if c.op not in covered]


CASES += _from_op_table_cases()


def build_case(op, inputs, attrs):
    """A one-node graph; returns (graph, feeds, kernel arguments)."""
    domain, _, op = ("tgraph", ".", op) if op == "CausalMask" else op.rpartition(".")
    g = Graph(name=f"case_{op.lower()}")
    b = Builder(g)
    feeds, args, values = {}, [], []
    for i, spec in enumerate(inputs):
        if isinstance(spec, In):
            name = f"in{i}"
            values.append(g.add_input(name, TensorType.of_array(spec.array)))
            feeds[name] = spec.array
            args.append(spec.array)
        elif spec is None:                    # an omitted optional input
            values.append(None)
            args.append(None)
        elif isinstance(spec, tuple):
            values.append(g.add_constant(spec[1], hint=f"layer.{i}.weight", is_param=True, exact_name=True))
            args.append(spec[1])
        else:
            values.append(b.const(spec, hint=f"c{i}"))
            args.append(np.asarray(spec))
    out = b.op(op, *values, domain=domain, **attrs)
    g.outputs = list(out) if isinstance(out, tuple) else [out]
    g.verify()
    return g, feeds, args


def run_generated(graph, feeds, tmp_path, stem="model"):
    path = write_numpy_module(graph, tmp_path / f"{stem}.py")
    module = load_numpy_module(path)
    return module.run(feeds)


def assert_same(got, want, what):
    want = np.asarray(want)
    assert isinstance(got, np.ndarray), what
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 if want.dtype != np.float16 else 1e-3,
                                   err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_op_matches_kernel_and_onnx_reference(case, tmp_path):
    _, op, inputs, attrs = case[:4]
    opset = case[4] if len(case) > 4 else onnx_default_opset()   # (an op-table case's newest opset)
    graph, feeds, args = build_case(op, inputs, attrs)
    got = run_generated(graph, feeds, tmp_path)
    names = [v.name for v in graph.outputs]
    assert list(got) == names

    qualified = "tgraph.CausalMask" if op == "CausalMask" else op
    node = graph.nodes[0]
    want = OPS[qualified].kernel(*args, **node.attrs)
    want = list(want) if isinstance(want, tuple) else [want]
    for name, w, v in zip(names, want, graph.outputs):
        assert_same(got[name], w, f"{case[0]} vs kernel")
        assert got[name].dtype == v.dtype.numpy     # the declared type, too

    onnx_codegen = pytest.importorskip("tgraph.codegen.onnx")
    from onnx.reference import ReferenceEvaluator

    if node.domain == "com.microsoft":                # onnx.reference has no contrib kernels
        import onnxruntime as ort

        sess = ort.InferenceSession(onnx_codegen.to_onnx(graph, opset=opset).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        for name, r in zip(names, sess.run(names, feeds)):
            np.testing.assert_allclose(got[name], r, rtol=1e-5, atol=1e-5, err_msg=f"{case[0]} vs onnxruntime")
        return
    ref = ReferenceEvaluator(onnx_codegen.to_onnx(graph, opset=opset)).run(None, feeds)
    for name, r in zip(names, ref):
        assert_same(got[name], r, f"{case[0]} vs onnx.reference")


def test_every_op_has_an_emitter_and_a_case():
    assert set(OPS) <= set(EMITTERS), sorted(set(OPS) - set(EMITTERS))
    assert not set(EMITTERS) - set(OPS), sorted(set(EMITTERS) - set(OPS))
    tested = {("tgraph." + c[1]) if c[1] == "CausalMask" else c[1] for c in CASES}
    assert set(OPS) <= tested, sorted(set(OPS) - tested)


def test_copied_kernels_are_self_contained():
    """Kernels are pasted into the module's `k` class: they may use only np, builtins and k.<kernel>."""
    from tgraph.codegen.numpy import Call
    from tgraph.codegen.numpy.generator import kernel_dependencies

    for emitter in EMITTERS.values():
        if isinstance(emitter, Call):
            kernel_dependencies(emitter.kernel)          # raises on anything else

    import json

    def leaky(x):
        return json.dumps(x)

    with pytest.raises(ExportError, match="json"):
        kernel_dependencies(leaky)


def test_kernel_dependencies_are_copied():
    g = Graph(name="gelu")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.float32, (3,)))
    g.outputs = [b.op("Gelu", x)]
    src = generate_source(g, "g.npz")
    assert "def gelu(" in src and "def erf(" in src and "k.erf(" in src


# ---------------------------------------------------------------- readability
def tiny_graph():
    g = Graph(name="tiny")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.float32, ("batch", "seq", 8)))
    w = g.add_constant(f32(8, 16), "enc.q.weight", is_param=True, exact_name=True)
    b.scope.append("enc.q")
    q = b.op("MatMul", x, w)
    b.scope.pop()
    scaled = b.op("Mul", q, b.const(np.float32(0.125), hint="scale"))
    heads = b.op("Reshape", scaled, b.const(i64(0, 0, 2, 8), hint="heads_shape"))
    t = b.op("Transpose", heads, perm=[0, 2, 1, 3])
    g.outputs = [b.op("Softmax", t, axis=-1)]
    return g


def test_generated_code_is_readable():
    g = tiny_graph()
    src = generate_source(g, "tiny.npz")
    lines = [line.strip() for line in src.splitlines()]
    assert "enc_q_matmul = x @ P['enc.q.weight']  # float32[batch,seq,16]  (enc.q)" in lines
    assert "mul = enc_q_matmul * np.float32(0.125)  # float32[batch,seq,16]" in lines
    assert "transpose = np.transpose(reshape, (0, 2, 1, 3))  # float32[batch,2,seq,8]" in lines
    assert "reshape = np.reshape(mul, (mul.shape[0], mul.shape[1], 2, 8))  # float32[batch,seq,2,8]" in lines
    assert "softmax = k.softmax(transpose)  # float32[batch,2,seq,8]" in lines
    assert "def softmax(x, axis=-1):" in lines          # kernel source copied...
    assert "def gemm(" not in src                       # ...only the ones used
    assert "x, = __check_inputs(inputs)" in lines
    assert "('x', np.float32, ('batch', 'seq', 8)),  # float32[batch,seq,8]" in lines
    doc = ast.get_docstring(ast.parse(src))
    assert 'graph "tiny"' in doc and "x: float32[batch,seq,8]" in doc and "softmax: float32[batch,2,seq,8]" in doc
    assert "tiny.run(" in doc
    # the generated module is deterministic
    assert generate_source(tiny_graph(), "tiny.npz").replace("tiny", "") == src.replace("tiny", "")


def test_generated_code_imports_only_numpy():
    g = tiny_graph()
    tree = ast.parse(generate_source(g, "m.npz"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"__import__", "eval", "exec", "compile", "open"}
    assert imported == {"numpy"}


def test_small_constants_inline_large_ones_in_weights(tmp_path):
    g = Graph(name="consts")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.float32, (4, INLINE_MAX_ELEMENTS + 1)))
    small = b.const(np.full(INLINE_MAX_ELEMENTS, 0.1, np.float32).reshape(1, -1)[:, :1], hint="small")
    big_arr = f32(INLINE_MAX_ELEMENTS + 1)
    big = b.const(big_arr, hint="big")
    g.outputs = [b.op("Add", b.op("Mul", x, big), small)]
    src = generate_source(g, "consts.npz")
    assert "np.array([[0.1]], dtype=np.float32)" in src
    assert "P['big']" in src
    xv = f32(4, INLINE_MAX_ELEMENTS + 1)
    out = run_generated(g, {"x": xv}, tmp_path)
    assert_same(out[g.outputs[0].name], xv * big_arr + np.float32(0.1), "consts")
    with np.load(tmp_path / "model.npz") as f:
        assert f.files == ["big"]


def test_float_literals_round_trip_exactly(tmp_path):
    values = np.array([0.1, 1e-5, -0.0, 3.4028235e38, 1.401298464324817e-45, 1 / 3, 2.0 ** -20], np.float32)
    g = Graph(name="floats")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.float32, (values.size,)))
    g.outputs = [b.op("Add", x, b.const(values, hint="c"))]
    got = run_generated(g, {"x": np.zeros(values.size, np.float32)}, tmp_path)[g.outputs[0].name]
    assert got.tobytes() == (np.zeros(values.size, np.float32) + values).tobytes()
    src = generate_source(g, "f.npz")
    assert "0.1, 1e-05" in src                           # shortest form where it is exact


# ---------------------------------------------------------------- safety
EVIL = [
    'x"); __import__("os").system("echo pwned > {sentinel}")  #',
    "x'); __import__('os').system('echo pwned > {sentinel}')  #",
    'x"""; __import__("os").system("echo pwned > {sentinel}"); """',
    "x\n__import__('os').system('echo pwned > {sentinel}')\n#",
    "x\r__import__('os').system('echo pwned > {sentinel}') \\",
    "x\\N{{ \u2028__import__('os').system('echo pwned > {sentinel}')",
]


@pytest.mark.parametrize("evil", EVIL, ids=["dquote", "squote", "triple", "newline", "cr_backslash", "escapes"])
def test_hostile_names_cannot_inject_code(evil, tmp_path):
    sentinel = tmp_path / "pwned"
    evil = evil.format(sentinel=sentinel)
    g = Graph(name=evil, meta={"model": evil})
    b = Builder(g)
    x = g.add_input(evil, TensorType(DType.float32, (evil, 3)))           # input name and a symbolic dim
    x2 = g.add_input("run", TensorType(DType.float32, (evil, 3)))         # a name the module itself uses
    w = g.add_constant(f32(3, 3), evil + ".weight", is_param=True, exact_name=True)
    b.scope.append(evil)                                                     # node scope
    h = b.op("MatMul", x, w)
    b.scope.pop()
    s = Value(evil + ".out", TensorType(DType.float32, (evil, 3)))          # a hand-made hostile value name
    g.append(Node("Add", [h, x2], [s], meta={"scope": evil}))
    np_alias = Value("np", TensorType(DType.float32, (evil, 3)))            # would shadow numpy
    g.append(Node("Relu", [s], [np_alias]))
    g.outputs = [s, np_alias, w]

    src = generate_source(g, "model.npz")
    compile(src, "model.py", "exec")
    assert src.count("\n") == len(src.splitlines()) and "\r" not in src and "\u2028" not in src
    xv, x2v = f32(2, 3), f32(2, 3)
    out = run_generated(g, {evil: xv, "run": x2v}, tmp_path)
    assert not sentinel.exists()
    assert list(out) == [evil + ".out", "np", evil + ".weight"]
    want = xv @ w.const + x2v
    assert_same(out[evil + ".out"], want, "hostile")
    assert_same(out["np"], np.maximum(want, 0), "hostile relu")
    assert_same(out[evil + ".weight"], w.const, "hostile weight")
    # the docstring still reads back the graph's exact name
    assert ast.get_docstring(ast.parse(src)).count(evil.replace("\n", "\\n").replace("\r", "\\r")
                                                   .replace("\u2028", "\\u2028")) >= 1


def test_values_never_shadow_module_names(tmp_path):
    g = Graph(name="shadow")
    x = g.add_input("inputs", TensorType(DType.float32, (2,)))
    cur = x
    for name in sorted(RESERVED | {"k", "softmax", "load_weights", "__file__", "_private", "class", "float"}):
        v = Value(name, TensorType(DType.float32, (2,)))
        g.append(Node("Softmax", [cur], [v], attrs={"axis": -1}))
        cur = v
    g.outputs = [cur]
    src = generate_source(g, "m.npz")
    tree = ast.parse(src)
    run_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    stored = {n.id for n in ast.walk(run_fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    assert not (stored - {"P"}) & (RESERVED | {"load_weights", "__file__"})
    assert not any(name.startswith("_") for name in stored)
    xv = f32(2)
    out = run_generated(g, {"inputs": xv}, tmp_path)
    want = xv
    for _ in range(len(g.nodes)):
        want = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
    assert_same(out[cur.name], want.astype(np.float32), "shadow")


def test_bfloat16_runs_through_ml_dtypes(tmp_path):
    """Types NumPy lacks come from ml_dtypes: the module imports it only when it needs it."""
    import ml_dtypes

    g = Graph(name="bf16")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.float32, (3,)))
    g.outputs = [b.op("Cast", x, to=DType.bfloat16)]
    assert "import ml_dtypes" in generate_source(g, "m.npz")
    assert "import ml_dtypes" not in generate_source(tiny_graph(), "m.npz")
    xs = np.array([1.0, 1.00390625, -3.5], np.float32)
    (got,) = run_generated(g, {"x": xs}, tmp_path).values()
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got.astype(np.float32), np.array([1.0, 1.0, -3.5], np.float32))  # round to even


@pytest.mark.parametrize("bad", ["/abs/m.npz", "", " m.npz", "C:\\m.npz"])
def test_weights_file_must_be_relative(bad):
    with pytest.raises(ExportError, match="relative"):
        generate_source(tiny_graph(), bad)


# ---------------------------------------------------------------- files
def test_weights_round_trip_and_lazy_single_load(tmp_path, monkeypatch):
    g = tiny_graph()
    path = write_numpy_module(g, tmp_path / "tiny.py")
    assert path == tmp_path / "tiny.py"
    with np.load(tmp_path / "tiny.npz", allow_pickle=False) as f:
        assert f.files == ["enc.q.weight"]
        np.testing.assert_array_equal(f["enc.q.weight"], g.constants["enc.q.weight"].const)
    module = load_numpy_module(path)
    assert module.P is None                                  # nothing read at import time
    calls = []
    real_load = module.np.load
    monkeypatch.setattr(module.np, "load", lambda *a, **kw: calls.append(a) or real_load(*a, **kw))
    xv = f32(2, 5, 8)
    first = module.run({"x": xv})
    second = module.run({"x": xv})
    assert len(calls) == 1
    out = g.outputs[0].name
    np.testing.assert_array_equal(first[out], second[out])
    w = g.constants["enc.q.weight"].const
    h = (xv @ w * np.float32(0.125)).reshape(2, 5, 2, 8).transpose(0, 2, 1, 3)
    e = np.exp(h - h.max(-1, keepdims=True))
    assert_same(first[out], e / e.sum(-1, keepdims=True), "tiny")
    with pytest.raises(ValueError, match="read-only"):
        module.P["enc.q.weight"][0, 0] = 1.0               # cached weights cannot be corrupted via outputs
    # two loads are independent modules
    other = load_numpy_module(path)
    assert other is not module and other.__name__ != module.__name__


def test_write_is_atomic_and_cleans_up(tmp_path, monkeypatch):
    import tgraph.codegen.numpy.files as files

    g = tiny_graph()
    write_numpy_module(g, tmp_path / "m.py")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real_replace = os.replace
    def failing_replace(src, dst):
        if str(dst).endswith(".py"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_numpy_module(g, tmp_path / "fresh.py")
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before   # no temporaries, no half pair

    bad = tiny_graph()
    bad.nodes[0].op = "NoSuchOp"
    with pytest.raises(ExportError, match="NoSuchOp"):
        write_numpy_module(bad, tmp_path / "m.py")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before   # old files untouched


def test_write_rejects_non_py_path(tmp_path):
    with pytest.raises(ExportError, match=r"\.py"):
        write_numpy_module(tiny_graph(), tmp_path / "model.txt")


def test_graph_without_weights(tmp_path):
    g = Graph(name="noweights")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.int64, ("n",)))
    g.outputs = [b.op("Mul", x, b.const(np.int64(3)))]
    out = run_generated(g, {"x": [1, 2, 3]}, tmp_path)       # lists are accepted and typed
    assert_same(out[g.outputs[0].name], i64(3, 6, 9), "noweights")


# ---------------------------------------------------------------- dtypes and whole models vs onnxruntime
def ort_run(graph, feeds):
    ort = pytest.importorskip("onnxruntime")
    onnx_codegen = pytest.importorskip("tgraph.codegen.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(onnx_codegen.to_onnx(graph).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return dict(zip([v.name for v in graph.outputs], sess.run(None, feeds)))


@pytest.mark.parametrize("dtype", [DType.float16, DType.float64, DType.int32])
def test_dtypes_never_widen(dtype, tmp_path):
    """Mixed chains keep the declared dtype (no float64 from Python scalars, int Div truncates)."""
    g = Graph(name=f"chain_{dtype.name}")
    b = Builder(g)
    npdt = dtype.numpy
    x = g.add_input("x", TensorType(dtype, ("n", 4)))
    c = lambda v: b.const(np.asarray(v, npdt))
    y = b.op("Div", b.op("Mul", b.op("Add", x, c(3)), c(5)), c([2, -3, 4, 7]))
    y = b.op("Sub", b.op("Pow", y, c(2)), b.op("ReduceSum", y, axes=[1], keepdims=1))
    outs = [y, b.op("Relu", b.op("Neg", y)), b.op("ReduceMean", y, axes=[0], keepdims=0)]
    if dtype.is_float:
        outs += [b.op("Softmax", y, axis=0), b.op("Sigmoid", y), b.op("Sqrt", b.op("Mul", y, y))]
    g.outputs = outs
    g.verify()
    own = np.random.default_rng(1)                   # fp16 must stay in range: y * y < 65504
    xv = (own.uniform(-2, 2, (3, 4)) if dtype.is_float else own.integers(-9, 9, (3, 4))).astype(npdt)
    got = run_generated(g, {"x": xv}, tmp_path)
    want = ort_run(g, {"x": xv})
    for v in g.outputs:
        assert got[v.name].dtype == npdt
        if dtype is DType.float16:
            np.testing.assert_allclose(got[v.name].astype(np.float32), want[v.name].astype(np.float32),
                                       rtol=1e-2, atol=1e-2)   # a chain of fp16 roundings
        else:
            assert_same(got[v.name], want[v.name], f"{dtype.name} {v.name}")


def test_negative_step_slice_clamps_like_onnxruntime(tmp_path):
    g, feeds, _ = build_case("Slice", [In(f32(5, 3)), i64(-10), i64(-100), i64(0), i64(-1)], {})
    got = run_generated(g, feeds, tmp_path)
    want = ort_run(g, feeds)
    name = g.outputs[0].name
    assert_same(got[name], want[name], "negative step")
    assert got[name].shape == (1, 3)


def test_constant_slices_match_the_kernel():
    """The Python-slicing shortcut agrees with kernels.slice over many bounds, axes and steps."""
    from tgraph.ir import kernels

    x = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    bounds = [-9, -7, -5, -1, 0, 1, 3, 5, 6, 7, 9, 2**63 - 1]
    cases = [(s, e, a, st) for s in bounds for e in bounds for a in (0, 1, -1) for st in (1, 2, 3)]
    g = Graph(name="slices")
    b = Builder(g)
    xin = g.add_input("x", TensorType.of_array(x))
    for s, e, a, st in cases[::7]:
        g.outputs.append(b.op("Slice", xin, b.const(i64(s)), b.const(i64(e)), b.const(i64(a)), b.const(i64(st))))
    src = generate_source(g, "s.npz")
    assert "x[" in src and "k.slice" not in src
    ns = {"__file__": "/nonexistent/s.py"}
    exec(compile(src, "s.py", "exec"), ns)
    ns["P"] = {}                                      # no weights needed
    got = ns["run"]({"x": x})
    for (s, e, a, st), v in zip(cases[::7], g.outputs):
        assert_same(got[v.name], kernels.slice(x, [s], [e], [a], [st]), f"slice {s}:{e}:{st} axis {a}")


def gpt_graph(d=32, heads=4, layers=2, vocab=50):
    """A GPT-2-shaped graph built op by op: LayerNorm, causal attention, erf-GELU MLP, tied logits."""
    g = Graph(name="gpt_tiny", meta={"model": "gpt_tiny", "layers": layers})
    b = Builder(g)
    ids = g.add_input("input_ids", TensorType(DType.int64, ("batch", "seq")))

    def p(name, *shape):
        return g.add_constant((rng.standard_normal(shape) * 0.2).astype(np.float32), name, is_param=True,
                              exact_name=True)

    def c(v, dt=np.float32):
        return b.const(np.asarray(v, dt))

    def layer_norm(x, name):
        xc = b.op("Sub", x, b.op("ReduceMean", x, axes=[-1]))
        var = b.op("ReduceMean", b.op("Mul", xc, xc), axes=[-1])
        y = b.op("Div", xc, b.op("Sqrt", b.op("Add", var, c(1e-5))))
        return b.op("Add", b.op("Mul", y, p(name + ".weight", d)), p(name + ".bias", d))

    def linear(x, name, n_in, n_out):
        return b.op("Add", b.op("MatMul", x, p(name + ".weight", n_in, n_out)), p(name + ".bias", n_out))

    def heads_of(t):
        return b.op("Transpose", b.op("Reshape", t, c([0, 0, heads, d // heads], np.int64)), perm=[0, 2, 1, 3])

    x = b.op("Gather", p("wte", vocab, d), ids)
    for i in range(layers):
        b.scope.append(f"h.{i}")
        q, k, v = b.op("Split", linear(layer_norm(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn", d, 3 * d),
                       axis=-1, split=[d, d, d])
        q, k, v = heads_of(q), heads_of(k), heads_of(v)
        s = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), c(1 / np.sqrt(d // heads)))
        a = b.op("Softmax", b.op("CausalMask", s, domain="tgraph"), axis=-1)
        o = b.op("Reshape", b.op("Transpose", b.op("MatMul", a, v), perm=[0, 2, 1, 3]), c([0, 0, d], np.int64))
        x = b.op("Add", x, linear(o, f"h.{i}.attn.c_proj", d, d))
        f = linear(layer_norm(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc", d, 4 * d)
        f = b.op("Mul", b.op("Mul", f, c(0.5)), b.op("Add", c(1.0), b.op("Erf", b.op("Mul", f, c(2 ** -0.5)))))
        x = b.op("Add", x, linear(f, f"h.{i}.mlp.c_proj", 4 * d, d))
        b.scope.pop()
    x = layer_norm(x, "ln_f")
    g.outputs = [b.op("MatMul", x, b.op("Transpose", g.constants["wte"], perm=[1, 0]), hint="logits")]
    g.verify()
    return g


def test_tiny_gpt_matches_onnxruntime_and_reference(tmp_path):
    g = gpt_graph()
    feeds = {"input_ids": rng.integers(0, 50, (2, 7))}
    got = run_generated(g, feeds, tmp_path, stem="gpt_tiny")
    want = ort_run(g, feeds)
    from onnx.reference import ReferenceEvaluator
    from tgraph.codegen.onnx import to_onnx

    ref = ReferenceEvaluator(to_onnx(g)).run(None, feeds)[0]
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["logits"], ref, rtol=1e-4, atol=1e-5)
    assert got["logits"].dtype == np.float32 and got["logits"].shape == (2, 7, 50)
    # causality: changing the last token leaves earlier positions unchanged
    feeds2 = {"input_ids": feeds["input_ids"].copy()}
    feeds2["input_ids"][:, -1] = (feeds2["input_ids"][:, -1] + 1) % 50
    module = load_numpy_module(tmp_path / "gpt_tiny.py")
    np.testing.assert_allclose(module.run(feeds2)["logits"][:, :-1], got["logits"][:, :-1], rtol=1e-5, atol=1e-6)
    assert "model: gpt_tiny" in ast.get_docstring(ast.parse((tmp_path / "gpt_tiny.py").read_text()))


def test_literals_are_exact_and_readable():
    from tgraph.codegen.numpy.literals import array_lit, attr_lit, comment, doc

    assert attr_lit(0.5) == "0.5" and attr_lit(0.1) == "0.1"
    assert attr_lit(float(np.float32(1e-5))) == "np.float32(1e-05)"     # ONNX float attrs are float32
    assert eval(attr_lit(float(np.float32(1e-5))), {"np": np}) == np.float32(1e-5)
    assert attr_lit(float("-inf")) == "-np.inf" and attr_lit([1]) == "(1,)" and attr_lit(DType.int64) == "np.int64"
    assert array_lit(np.zeros((0, 3), np.int32)) == "np.zeros((0, 3), dtype=np.int32)"
    for a in [np.array([[1.5, -0.0], [np.nan, np.inf]], np.float16), np.array([True, False]), np.int64(-3),
              np.array([2**63 - 1, -2**63], np.int64), np.array(np.pi, np.float64)]:
        back = eval(array_lit(np.asarray(a)), {"np": np})
        assert back.dtype == np.asarray(a).dtype and back.tobytes() == np.asarray(a).tobytes()
    assert comment("a\nb\r\x00\u2028") == "a\\nb\\r\\x00\\u2028"
    assert eval('"""' + doc('x"""\\\n') + '"""') == 'x"""\\\n'
