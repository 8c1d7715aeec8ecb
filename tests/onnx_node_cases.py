"""ONNX's own backend node tests, for the op subset a Transformer graph uses.

The cases are ONNX's: `onnx.backend.test.case.node` builds each test's model and its
input/expected-output arrays (the same ones `onnx/backend/test/data/node/*` is written
from; recent onnx wheels ship the generators, not the files). Importing only the modules
of the selected ops keeps collection fast. Each case is run four ways:

* ``tgraph``: `import_onnx`, then the generated NumPy module (the NumPy backend);
* ``reference``: `onnx.reference.ReferenceEvaluator` on the original model;
* ``ort``: onnxruntime (CPU, graph optimizations off) on the original model;
* ``ort_reexport``: onnxruntime on `to_onnx(import_onnx(model))`.

An outcome is "pass", "fail" (wrong numbers, shapes or dtypes), "refused" (a one-line
`TgraphError` from tgraph) or "error" (anything else: a crash, a runtime's refusal).

``python tests/onnx_node_cases.py`` prints the per-op table and the totals.
"""
from __future__ import annotations

import functools
import importlib
import re
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

# The modules of onnx.backend.test.case.node whose ops a Transformer graph uses: the
# arithmetic, activations, norms, attention and rotary ops, reductions and arg-reductions,
# shape and indexing ops, casts, einsum, and the (de)quantization of quantized LLMs.
TRANSFORMER_MODULES = (
    "abs", "add", "and_", "argmax", "argmin", "attention", "cast", "castlike", "ceil", "celu", "clip",
    "concat", "constant", "constantofshape", "cos", "cumsum", "dequantizelinear", "div", "dropout",
    "dynamicquantizelinear", "einsum", "elu", "equal", "erf", "exp", "expand", "eyelike", "flatten", "floor",
    "gather", "gatherelements", "gathernd", "gelu", "gemm", "greater", "greater_or_equal", "hardmax",
    "hardsigmoid", "hardswish", "identity", "isinf", "isnan", "layernormalization", "leakyrelu", "less",
    "less_or_equal", "log", "logsoftmax", "matmul", "matmulinteger", "max", "mean", "min", "mish", "mod", "mul",
    "neg", "nonzero", "not_", "onehot", "or_", "pad", "pow", "prelu", "quantizelinear", "rangeop",
    "reciprocal", "reduce_log_sum", "reduce_log_sum_exp", "reducel1", "reducel2", "reducemax", "reducemean",
    "reducemin", "reduceprod", "reducesum", "reducesumsquare", "relu", "reshape", "rmsnormalization",
    "rotaryembedding", "round", "scatterelements", "scatternd", "selu", "shape", "sigmoid", "sign", "sin",
    "size", "slice", "softmax", "softplus", "softsign", "split", "sqrt", "squeeze", "sub", "sum", "swiglu",
    "swish", "tanh", "thresholdedrelu", "tile", "topk", "transpose", "trilu", "unsqueeze", "where", "xor",
)

OUTCOMES = ("pass", "fail", "refused", "error")
MEASURES = ("tgraph", "reference", "ort", "ort_reexport")


@dataclass
class NodeCase:
    name: str
    op: str                          # the op under test (for "_expanded" cases, the function's op)
    model: "onnx.ModelProto"
    inputs: List[np.ndarray]
    outputs: List[np.ndarray]
    rtol: float
    atol: float


def _tested_op(case) -> str:
    nodes = case.model.graph.node
    for node in nodes:
        for out in node.output:
            m = re.match(r"(\w+?)_test_\w*_expanded_function_", out)
            if m:
                return m.group(1)
    return nodes[-1].op_type


def _array(a) -> np.ndarray:
    """ONNX gives exotic element types (float8, int4, bfloat16) as TensorProtos: as ml_dtypes arrays."""
    from onnx import TensorProto, numpy_helper

    return numpy_helper.to_array(a) if isinstance(a, TensorProto) else np.asarray(a)


def _tensor_only(case) -> bool:
    g = case.model.graph
    return all(vi.type.HasField("tensor_type") for vi in list(g.input) + list(g.output))


@functools.lru_cache(maxsize=1)
def collect() -> Tuple[NodeCase, ...]:
    """The node test cases of `TRANSFORMER_MODULES` (tensor inputs and outputs only)."""
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in TRANSFORMER_MODULES:    # importing a module runs its cases' `expect` calls
            importlib.import_module(f"onnx.backend.test.case.node.{name}")
    out = []
    for c in node_cases._NodeTestCases:     # (only these modules are imported in the test process)
        if not _tensor_only(c):
            continue
        (inputs, outputs), = c.data_sets
        out.append(NodeCase(c.name, _tested_op(c), c.model, [_array(a) for a in inputs],
                            [_array(a) for a in outputs], c.rtol, c.atol))
    return tuple(sorted(out, key=lambda c: c.name))


# ------------------------------------------------------------------------------ comparison
def compare(expected: List[np.ndarray], actual: List[np.ndarray], rtol: float, atol: float) -> Optional[str]:
    """None when `actual` matches as ONNX's backend runner checks it, else why not (one line)."""
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (want, got) in enumerate(zip(expected, actual)):
        want, got = np.asarray(want), np.asarray(got)
        if got.shape != want.shape:
            return f"output {i}: shape {list(got.shape)}, expected {list(want.shape)}"
        if got.dtype != want.dtype:
            return f"output {i}: dtype {got.dtype}, expected {want.dtype}"
        if want.dtype.itemsize == 1:              # bool, (u)int8, float8, (u)int4 ...: exact, bit for bit
            if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
                return f"output {i}: values differ"
            continue
        if want.dtype == object or want.dtype.kind in "biuSU":
            if not np.array_equal(got, want):
                return f"output {i}: values differ"
            continue
        r = rtol
        g64, w64 = got.astype(np.float64), want.astype(np.float64)
        if want.dtype.name == "bfloat16":
            r = max(rtol, 2 ** -6)
        if not np.allclose(g64, w64, rtol=r, atol=atol, equal_nan=True):
            err = np.nanmax(np.abs(g64 - w64)) if g64.size else 0.0
            return f"output {i}: values differ (max abs error {err:.3g})"
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------ the four runs
def _feeds(model, inputs) -> Dict[str, np.ndarray]:
    names = [vi.name for vi in model.graph.input]
    return dict(zip(names, inputs))


def run_tgraph(case: NodeCase) -> Tuple[str, str, Optional["Graph"]]:
    """(outcome, detail, imported graph or None): import, then the generated NumPy module."""
    from tgraph.codegen.numpy import generate_source, plan_weights
    from tgraph.errors import TgraphError
    from tgraph.onnx_import import import_onnx

    try:
        graph = import_onnx(case.model)
    except TgraphError as e:
        detail = str(e)
        return ("refused" if "\n" not in detail else "error"), detail, None
    except Exception as e:                      # a crash, not a refusal
        return "error", _one_line(e), None
    try:
        source = generate_source(graph, "weights.npz")
        namespace: Dict[str, object] = {"__name__": f"tgraph_node_case_{case.name}", "__file__": "<node case>"}
        exec(compile(source, f"<{case.name}>", "exec"), namespace)
        namespace["P"] = plan_weights(graph)
        with np.errstate(all="ignore"):
            result = namespace["run"](_feeds(case.model, case.inputs))
        actual = [result[o.name] for o in case.model.graph.output]
    except TgraphError as e:
        detail = str(e)
        return ("refused" if "\n" not in detail else "error"), detail, graph
    except Exception as e:
        return "error", _one_line(e), graph
    why = compare(case.outputs, actual, case.rtol, case.atol)
    return ("pass", "", graph) if why is None else ("fail", why, graph)


def run_reference(case: NodeCase) -> Tuple[str, str]:
    from onnx.reference import ReferenceEvaluator

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            actual = ReferenceEvaluator(case.model).run(None, _feeds(case.model, case.inputs))
    except Exception as e:
        return "error", _one_line(e)
    why = compare(case.outputs, actual, case.rtol, case.atol)
    return ("pass", "") if why is None else ("fail", why)


def run_ort(model, case: NodeCase) -> Tuple[str, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: a for i, a in zip(sess.get_inputs(), case.inputs)}
        actual = sess.run(None, feeds)
    except Exception as e:
        return "error", _one_line(e)
    why = compare(case.outputs, actual, case.rtol, case.atol)
    return ("pass", "") if why is None else ("fail", why)


def reexport(graph) -> "onnx.ModelProto":
    """The imported graph written back at its opset (tgraph writes opsets 17..25)."""
    from tgraph.codegen.onnx import to_onnx
    from tgraph.codegen.onnx.export import SUPPORTED_OPSETS

    opset = graph.meta.get("onnx_opset", max(SUPPORTED_OPSETS))
    opset = min(max(opset, min(SUPPORTED_OPSETS)), max(SUPPORTED_OPSETS))
    return to_onnx(graph, opset=opset)


def run_all(case: NodeCase, measures=MEASURES) -> Dict[str, Tuple[str, str]]:
    """Outcome and detail of each measure for one case."""
    out: Dict[str, Tuple[str, str]] = {}
    outcome, detail, graph = run_tgraph(case)
    out["tgraph"] = (outcome, detail)
    if "reference" in measures:
        out["reference"] = run_reference(case)
    if "ort" in measures:
        out["ort"] = run_ort(case.model, case)
    if "ort_reexport" in measures:
        if graph is None:
            out["ort_reexport"] = ("refused", detail)
        else:
            from tgraph.errors import TgraphError

            try:
                model = reexport(graph)
            except TgraphError as e:
                out["ort_reexport"] = ("refused", _one_line(e))
            except Exception as e:
                out["ort_reexport"] = ("error", _one_line(e))
            else:
                out["ort_reexport"] = run_ort(model, case)
    return out


def table(results: Dict[str, Dict[str, Tuple[str, str]]], cases) -> str:
    by_op: Dict[str, Counter] = defaultdict(Counter)
    for case in cases:
        for m, (outcome, _) in results[case.name].items():
            by_op[case.op][(m, outcome)] += 1
            by_op[case.op]["n"] += 1 if m == "tgraph" else 0
    lines = [f"{'op':28s} {'n':>4s} " + " ".join(f"{m:>12s}" for m in MEASURES)]
    for op in sorted(by_op):
        c = by_op[op]
        lines.append(f"{op:28s} {c['n']:4d} " + " ".join(f"{c[(m, 'pass')]:12d}" for m in MEASURES))
    total = Counter()
    for c in by_op.values():
        total.update(c)
    lines.append(f"{'TOTAL':28s} {total['n']:4d} " + " ".join(f"{total[(m, 'pass')]:12d}" for m in MEASURES))
    return "\n".join(lines)


def main(argv=None) -> int:
    import time

    argv = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    cases = collect()
    t1 = time.perf_counter()
    results = {c.name: run_all(c) for c in cases}
    t2 = time.perf_counter()
    print(table(results, cases))
    print(f"collected {len(cases)} cases in {t1 - t0:.1f}s, ran them in {t2 - t1:.1f}s")
    if "-v" in argv:
        for c in cases:
            r = results[c.name]
            if r["tgraph"][0] != "pass":
                print(f"{c.name}: {r['tgraph'][0]}: {r['tgraph'][1]}  [ref {r['reference'][0]}, ort {r['ort'][0]}]")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    raise SystemExit(main())
