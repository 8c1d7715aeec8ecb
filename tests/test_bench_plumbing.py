"""The generation benchmark's pure plumbing (bench/generate.py, bench/peers/protocol.py), without peers.

Hand-computed expectations: result parsing, medians, first divergence, byte counts and floors,
the alternation order, the export cache, and the runner protocol's stdout isolation.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_generate"] = bench        # dataclasses look their module up
_spec.loader.exec_module(bench)


def test_parse_points_and_refusal():
    points = bench.parse_points("p32, p1024,p32b8", new=128)
    assert [(p.name, p.prompt, p.batch, p.new) for p in points] == [
        ("p32", 32, 1, 128), ("p1024", 1024, 1, 128), ("p32b8", 32, 8, 128)]
    for bad in ("32", "p0", "p32b0", "p32x8", ""):
        with pytest.raises(SystemExit):
            bench.parse_points(bad, new=4)


def test_round_order_rotates_every_position_once():
    names = ["a", "b", "c"]
    rounds = [bench.round_order(names, r) for r in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert sorted(r[position] for r in rounds) == names
    assert bench.round_order(names, 4) == rounds[1]
    assert bench.round_order([], 2) == []


def test_prompts_fixed_and_row0_shared_across_batches():
    p1, p8 = bench.parse_points("p32,p32b8", new=4)
    a, b = bench.prompts_for(p1, 32000, 0), bench.prompts_for(p8, 32000, 0)
    assert a == bench.prompts_for(p1, 32000, 0) and len(b) == 8 and b[0] == a[0]
    assert all(3 <= t < 32000 for row in b for t in row)


def _reply(start, stamps, end, ids, rss=5 * 2**20):
    return {"ok": True, "start": start, "stamps": stamps, "end": end, "ids": ids, "peak_rss_bytes": rss}


def test_parse_run_prefill_steps_total():
    point = bench.Point("p4", 4, 2, 3)
    run = bench.parse_run(_reply(10.0, [10.5, 10.6, 10.8], 10.9, [[1, 2, 3], [4, 5, 6]]), point)
    assert run.prefill_s == pytest.approx(0.5)
    assert run.steps_s == pytest.approx([0.1, 0.2])
    assert run.total_s == pytest.approx(0.9)
    with pytest.raises(ValueError, match="stamps"):
        bench.parse_run(_reply(0, [1, 2], 3, [[1, 2, 3], [4, 5, 6]]), point)
    with pytest.raises(ValueError, match="rows"):
        bench.parse_run(_reply(0, [1, 2, 3], 3, [[1, 2, 3]]), point)


def test_summarise_medians_and_peak():
    point = bench.Point("p4", 4, 2, 3)
    runs = [bench.Run([[0] * 3] * 2, prefill_s=p, steps_s=s, total_s=t, peak_rss=m * 2**20)
            for p, s, t, m in ((0.1, [0.01, 0.03], 1.0, 100), (0.3, [0.02, 0.02], 2.0, 300),
                               (0.2, [0.04, 0.06], 4.0, 200))]
    s = bench.summarise(runs, point)
    assert s.prefill_ms == pytest.approx(200)          # median of 100, 300, 200 ms
    assert s.decode_ms == pytest.approx(20)            # median of per-run medians 20, 20, 50 ms
    assert s.tokens_per_s == pytest.approx(2 * 1000 / 20)
    assert s.e2e_tokens_per_s == pytest.approx(6 / 2.0)  # median of 6/1, 6/2, 6/4
    assert s.peak_rss_mb == pytest.approx(300)
    assert s.decode_spread == pytest.approx((20, 50))


def test_first_divergence():
    ref = [[1, 2, 3], [4, 5, 6]]
    assert bench.first_divergence(ref, [[1, 2, 3], [4, 5, 6]]) is None
    assert bench.first_divergence(ref, [[1, 2, 3], [4, 9, 6]]) == (1, 1, 5, 9)
    assert bench.first_divergence(ref, [[1, 2], [4, 5, 6]]) == (0, 2, 3, -1)
    assert "row 1 step 1" in bench.describe_ids("hf", ref, [[1, 2, 3], [4, 9, 6]])
    assert bench.describe_ids("hf", ref, ref) == "= hf"


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype), name)


def test_weight_bytes_onnx_gather_rows_and_shared_tables():
    """emb [10, 4] only gathered: one 16-B row; w [4, 3] read whole; tied [10, 4] gathered AND
    used by a MatMul: whole; q uint8 [3, 8] (a MatMulNBits blob) read whole at 1 B each."""
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "w"], ["y"]),
             helper.make_node("Gather", ["tied", "ids"], ["e2"]),
             helper.make_node("MatMul", ["e2", "tiedT"], ["y2"]),
             helper.make_node("Transpose", ["tied"], ["tiedT"]),
             helper.make_node("Identity", ["q"], ["qo"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "y2", "qo")],
                              [_init("emb", (10, 4)), _init("w", (4, 3)), _init("tied", (10, 4)),
                               _init("q", (3, 8), np.uint8), _init("unused", (5,))])
    counted = bench.weight_bytes_onnx(helper.make_model(graph))
    assert counted == {"read": 4 * 3 * 4 + 10 * 4 * 4 + 24, "row": 16, "total": 160 + 48 + 160 + 24 + 20}


def test_weight_bytes_safetensors_header(tmp_path):
    header = {"__metadata__": {"format": "pt"},
              "model.embed_tokens.weight": {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]},
              "lm_head.weight": {"dtype": "F32", "shape": [10, 4], "data_offsets": [160, 320]},
              "model.norm.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [320, 328]}}
    blob = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(328))
    assert bench.weight_bytes_safetensors(path) == {"read": 160 + 8, "row": 16, "total": 328}


def test_kv_bytes_step_bytes_and_floor():
    point = bench.Point("p32", 32, 1, 128)
    per_position = 2 * 12 * 4 * 64 * 4                       # K and V, 12 layers, 4 KV heads, dim 64, fp32
    assert bench.kv_bytes_per_step(bench.LLAMA_CONFIG, point) == per_position * (32 + 64)
    p8 = bench.Point("p32b8", 32, 8, 128)
    weights = {"read": 1000, "row": 10, "total": 0}
    assert bench.step_bytes(weights, bench.LLAMA_CONFIG, p8) == 1000 + 80 + 8 * per_position * 96
    assert bench.floor_ms(400e6, 20.0) == pytest.approx(20.0)


def test_export_options_from_help():
    old = "usage: tgraph export [-h] -o OUTPUT [-O {0,1,2,3}] [--set KEY=VALUE] [--opset OPSET]"
    new = old + " [--task {onnx,generate}] [--max-length N]\n  --quantize {int4,int8}\n  --block-size N"
    assert bench.export_options(old) == {"task": False, "quantize": False, "block_size": False, "max_length": False}
    assert bench.export_options(new) == {"task": True, "quantize": True, "block_size": True, "max_length": True}
    assert bench.export_options("--task-name X")["task"] is False


def test_cached_build_reuses_rebuilds_and_leaves_no_partial(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        out.mkdir()
        (out / "model.onnx").write_text("x")

    first = bench.cached_build(tmp_path, "m", "k1", build, "cmd")
    again = bench.cached_build(tmp_path, "m", "k1", build, "cmd")
    assert len(calls) == 1 and not first.cached and again.cached and again.seconds == first.seconds
    bench.cached_build(tmp_path, "m", "k2", build, "cmd")
    assert len(calls) == 2

    def broken(out):
        out.mkdir()
        raise RuntimeError("exit 1")

    with pytest.raises(RuntimeError):
        bench.cached_build(tmp_path, "n", "k", broken, "cmd")
    assert not (tmp_path / "n").exists()


FAKE_RUNNER = """
import sys
sys.path.insert(0, {peers!r})
import protocol

def load(size):
    print("library noise on stdout")
    return size, {{"size": size}}

def run(size, prompts, new):
    print("more noise")
    stamps = protocol.Stamps()
    for _ in range(new):
        stamps.stamp()
    if new == 99:
        raise ValueError("bad new\\nsecond line")
    return [[7] * new for _ in prompts], stamps.finish()

protocol.serve(load, run)
"""


def test_runner_protocol_keeps_replies_clean_of_library_output():
    script = FAKE_RUNNER.format(peers=str(ROOT / "bench" / "peers"))
    requests = [{"cmd": "load", "size": 3}, {"cmd": "run", "prompts": [[1], [2]], "new": 2},
                {"cmd": "run", "prompts": [[1]], "new": 99}, {"cmd": "quit"}]
    done = subprocess.run([sys.executable, "-c", script], input="\n".join(json.dumps(r) for r in requests) + "\n",
                          capture_output=True, text=True, timeout=60)
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(replies) == 4, done.stdout
    assert replies[0]["ok"] and replies[0]["info"] == {"size": 3} and replies[0]["rss_bytes"] > 0
    run = bench.parse_run(replies[1], bench.Point("p1", 1, 2, 2))
    assert run.ids == [[7, 7], [7, 7]] and run.peak_rss > 0
    assert replies[2] == {"ok": False, "error": "ValueError: bad new"}
    assert replies[3] == {"ok": True}
    assert "library noise" in done.stderr and "more noise" in done.stderr


def test_tgraph_options_are_json_or_text():
    assert bench.parse_options(["kv_cache=dynamic", "max_length=1152", "x=true"]) == {
        "kv_cache": "dynamic", "max_length": 1152, "x": True}
    assert bench.parse_options(None) == {}
    with pytest.raises(SystemExit):
        bench.parse_options(["no-equals"])


def test_tgraph_keys_and_pythons():
    assert bench.parse_tgraph_key("tgraph") == bench.TgraphSpec(None, False, "")
    assert bench.parse_tgraph_key("tgraph-O2@h6") == bench.TgraphSpec(2, False, "h6")
    assert bench.parse_tgraph_key("tgraph-int4@h7") == bench.TgraphSpec(None, True, "h7")
    assert bench.parse_tgraph_key("tgraph-int4-sym") == bench.TgraphSpec(None, True, "", symmetric=True)
    assert bench.parse_tgraph_key("tgraph-O2-sym") is None
    assert bench.parse_tgraph_key("genai") is None and bench.parse_tgraph_key("tgraph-int8") is None
    assert bench.parse_pythons(["h6=/a/python", "/b/python"], "/default") == {"": "/b/python", "h6": "/a/python"}
    with pytest.raises(SystemExit):
        bench.parse_pythons(["bad tag=/x"], "/d")


def test_targets_compare_each_tgraph_with_genai():
    def s(decode_ms, prefill_ms=100.0, batch=1):
        return bench.Summary(prefill_ms, decode_ms, batch * 1000 / decode_ms, 0.0, 0.0, (decode_ms, decode_ms))

    points = bench.parse_points("p32,p1024", new=4)
    table = {"p32": {"tgraph": s(30), "tgraph@h6": s(20), "genai": s(25), "genai-int4": s(6),
                     "genai-int4-asym": s(4), "tgraph-int4@h6": s(5), "tgraph-int4-sym@h6": s(5)},
             "p1024": {"tgraph": s(45), "tgraph@h6": s(22), "genai": s(28)}}
    lines = bench.check_targets(points, table)
    text = "\n".join(lines)
    assert "p32: tgraph decode tokens/s 0.83x genai fp32 (issue 9, >= 1.2x: NOT met)" in text
    assert "p32: tgraph@h6 decode tokens/s 1.25x genai fp32 (issue 9, >= 1.2x: met)" in text
    # each int4 format against genai's of the same format: symmetric vs its default, zero points vs asym
    assert "p32: tgraph-int4-sym@h6 1.20x genai-int4 (issue 10, >= 1x: met)" in text
    assert "p32: tgraph-int4@h6 0.80x genai-int4-asym (issue 10, >= 1x: NOT met)" in text
    assert "p32: tgraph-int4@h6 4.00x its fp32 (issue 10, >= 3.5x: met)" in text
    assert "tgraph: decode ms/step p1024 / p32 = 1.50 (issue 9, <= 1.3: NOT met)" in text
    assert "tgraph@h6: decode ms/step p1024 / p32 = 1.10 (issue 9, <= 1.3: met)" in text
