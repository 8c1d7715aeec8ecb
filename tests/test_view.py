"""`tgraph view`: SVG and HTML pictures of the IR, checked against the IR they draw.

The SVG is parsed as XML and its vertices counted against the graph's nodes; the HTML
is loaded in a real headless browser (Debian's chromium), whose DOM after the page's
script ran is compared with the IR, and a screenshot is taken.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tgraph.api import build
from tgraph.cli import main
from tgraph.view import view
from tgraph.view.graph import collapse, diff, ir_to_networkx, layers, op_count, scope_levels

GPT2 = {"n_layer": "2", "n_embd": "32", "n_head": "4", "vocab_size": "64", "n_positions": "32"}
SETS = [a for k, v in GPT2.items() for a in ("--set", f"{k}={v}")]
SVG = "{http://www.w3.org/2000/svg}"


def _svg_groups(path: Path, cls: str):
    root = ET.parse(path).getroot()
    return [g for g in root.iter(f"{SVG}g") if cls in (g.get("class") or "").split()]


def _ir(level: int):
    return build("gpt2", GPT2, level=level).graph


def test_scope_levels_keep_an_index_with_its_container():
    assert scope_levels("h.0.attn.q_proj") == ("h.0", "h.0.attn", "h.0.attn.q_proj")
    assert scope_levels("encoder.layer.11.output") == ("encoder", "encoder.layer.11", "encoder.layer.11.output")
    assert scope_levels("") == ()


def test_networkx_graph_has_one_vertex_per_op_and_typed_edges():
    graph = _ir(0)
    g = ir_to_networkx(graph)
    assert op_count(g) == len(graph.nodes)
    assert {d["kind"] for _, d in g.nodes(data=True)} == {"input", "op", "output"}
    labels = {d["label"] for _, _, d in g.edges(data=True)}
    assert "float32[batch,seq,32]" in labels and "int64[batch,seq]" in labels
    assert layers(g) == ["h.0", "h.1"]


def test_collapsing_a_layer_keeps_every_op_accounted_for():
    g = ir_to_networkx(_ir(2))
    for keep in ([], ["h.0"], ["h.1"]):
        c = collapse(g, keep)
        boxes = [d for _, d in c.nodes(data=True) if d["kind"] == "layer"]
        assert len(boxes) == 2 - len(keep)
        assert op_count(c) + sum(b["ops"] for b in boxes) == op_count(g)
        assert all(b["fused_ops"] for b in boxes)      # each GPT-2 layer holds Attention, LayerNorm, Gelu


def test_passes_record_which_pass_created_a_node():
    graph = _ir(2)
    made = {n.op: n.meta.get("created_by") for n in graph.nodes if n.op in ("Attention", "LayerNormalization", "Gelu")}
    assert made == {"Attention": "fuse-attention", "LayerNormalization": "fuse-layer-norm", "Gelu": "fuse-gelu"}
    traced = [n for n in graph.nodes if n.op == "MatMul"]
    assert traced and all("created_by" not in n.meta for n in traced)


def test_diff_names_what_the_passes_removed_and_created():
    before = ir_to_networkx(_ir(0))
    after = ir_to_networkx(_ir(2))
    d = diff(before, after)
    created = d.histogram(after, d.created)
    assert created == {"LayerNormalization": 5, "Attention": 2, "Gelu": 2}
    assert d.histogram(before, d.removed)["Softmax"] == 2
    assert d.kept + len(d.created) == op_count(after)
    assert d.kept + len(d.removed) == op_count(before)


@pytest.mark.parametrize("level", [0, 2])
def test_cli_svg_of_gpt2_draws_every_op_and_highlights_the_fused_ones(tmp_path, capsys, level):
    out = tmp_path / f"gpt2-O{level}.svg"
    assert main(["view", "gpt2", "-o", str(out), "-O", str(level), *SETS]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    graph = _ir(level)
    assert len(_svg_groups(out, "op")) == len(graph.nodes)
    fused = [n for n in graph.nodes if n.op in ("Attention", "LayerNormalization", "Gelu")]
    assert len(_svg_groups(out, "fused")) == len(fused) == (0 if level == 0 else 9)
    clusters = {g.get("id") for g in _svg_groups(out, "cluster")}
    assert {"cluster-h.0", "cluster-h.1", "cluster-h.0.attn", "cluster-h.1.mlp"} <= clusters
    texts = {t.text for t in ET.parse(out).getroot().iter(f"{SVG}text")}
    assert "float32[batch,seq,32]" in texts
    assert ("(fuse-attention)" in texts) == bool(level)


def test_before_after_svg_marks_removed_and_created_ops(tmp_path):
    out = tmp_path / "ba.svg"
    assert main(["view", "gpt2", "-o", str(out), "-O", "2", "--before-after", *SETS]) == 0
    d = diff(ir_to_networkx(_ir(0)), ir_to_networkx(_ir(2)))
    assert len(_svg_groups(out, "removed")) == len(d.removed)
    assert len(_svg_groups(out, "created")) == len(d.created) == 9
    assert len(_svg_groups(out, "op")) == len(_ir(0).nodes) + len(_ir(2).nodes)


def _hostile_onnx(path: Path) -> None:
    evil = '"];\\N<script>alert(1)</script>'
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name=evil), helper.make_node("Neg", ["h"], ["y"], name="/a:b/Neg")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))


def test_names_from_a_graph_are_drawn_not_interpreted(tmp_path):
    src = tmp_path / "evil.onnx"
    _hostile_onnx(src)
    for suffix in (".svg", ".html"):
        out = tmp_path / f"evil{suffix}"
        assert main(["view", str(src), "-o", str(out), "-O", "0"]) == 0
        text = out.read_text()
        assert "<script>alert" not in text
        if suffix == ".svg":
            assert len(_svg_groups(out, "op")) == 2          # still two vertices: no name split the graph
        else:
            assert text.count("<script") == 1                # the page's own script only


def test_bad_requests_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    cases = [(["view", "gpt2", "-o", str(tmp_path / "x.png")], "must end in .svg or .html"),
             (["view", "gpt2", "-o", str(tmp_path / "x.svg"), "-O", "0", "--before-after"], "--before-after"),
             (["view", "gpt2"], "needs -o"),
             (["view", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.svg")], "ONNX file not found")]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tgraph: error:") and words in err[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_graphviz_is_named(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))       # no `dot` on this PATH
    out = tmp_path / "x.svg"
    proc = subprocess.run([sys.executable, "-m", "tgraph.cli", "view", "gpt2", "-o", str(out), *SETS],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("tgraph: error: Graphviz's `dot` program is not installed "
                                   "(Debian/Ubuntu: apt-get install graphviz)")
    assert not out.exists()


# ---------------------------------------------------------------- a real browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("the HTML view test needs a headless browser: apt-get install chromium (see .ci/run)")


def _browser(html: Path, fragment: str, *args: str) -> str:
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={html.parent / 'chrome-profile'}", *args, f"file://{html}#{fragment}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _body(dom: str) -> ET.Element:
    start = dom.index("<body")
    return ET.fromstring(dom[start:dom.index(">", start) + 1].rstrip(">").rstrip("/") + "/>")


def test_html_view_loads_in_a_headless_browser_with_the_expected_node_counts(tmp_path):
    html = tmp_path / "gpt2.html"
    result = view("gpt2", html, level=2, overrides=GPT2)
    graph = _ir(2)
    scope = {n.name: n.meta.get("scope") or "" for n in graph.nodes}
    in_layer = {name: [n for n, s in scope.items() if s == name or s.startswith(name + ".")] for name in ("h.0", "h.1")}
    outside = len(graph.nodes) - sum(len(v) for v in in_layer.values())
    expected = {"all": len(graph.nodes), "overview": outside, "layer-h.1": outside + len(in_layer["h.1"])}
    assert result.ops == len(graph.nodes)
    for fragment, ops in expected.items():
        dom = _browser(html, f"view={fragment}", "--dump-dom", "--virtual-time-budget=3000")
        body = _body(dom)
        assert body.get("data-error") is None and "<title>ERROR" not in dom
        assert body.get("data-shown") == fragment
        assert int(body.get("data-shown-ops")) == ops, fragment
        assert f'<span id="node-count">{ops}</span>' in dom
    shot = tmp_path / "gpt2.png"
    _browser(html, "view=overview", f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900) and len(data) > 20_000      # a drawn page, not a blank one


# ---------------------------------------------------------------- Netron
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_netron_serves_the_onnx_file_on_localhost_until_interrupted(tmp_path):
    import netron  # noqa: F401  (in the test extra: a missing one fails here, it is not skipped)

    src = tmp_path / "evil.onnx"
    _hostile_onnx(src)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tgraph.cli", "view", str(src), "--netron", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, page = time.monotonic() + 60, None
        while time.monotonic() < deadline and page is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    page = r.read().decode("utf-8", "replace")
            except OSError:
                time.sleep(0.2)
        assert page is not None and '<meta name="file" content="/data/evil.onnx">' in page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/evil.onnx", timeout=5) as r:
            assert onnx.load_from_string(r.read()).graph.node[0].op_type == "Relu"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in out and "Traceback" not in err


def test_an_imported_graph_is_clustered_by_the_module_path_in_its_node_names(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="/model/layers.0/mlp/Relu"),
             helper.make_node("Neg", ["h"], ["y"], name="/model/layers.1/Neg_1")]
    src = tmp_path / "torch_style.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)]),
              str(src))
    out = tmp_path / "t.svg"
    assert main(["view", str(src), "-o", str(out), "-O", "0"]) == 0
    clusters = {g.get("id") for g in _svg_groups(out, "cluster")}
    assert clusters == {"cluster-model", "cluster-model.layers.0", "cluster-model.layers.0.mlp", "cluster-model.layers.1"}


def test_the_readme_picture_is_what_tgraph_view_draws(tmp_path):
    """README's picture is generated: drawing it again gives the same vertices and clusters."""
    committed = Path(__file__).resolve().parents[1] / "examples" / "pictures" / "gpt2-1layer-O2.svg"
    readme = (committed.parents[2] / "README.md").read_text()
    command = readme[readme.index("tgraph view gpt2 -o examples/pictures/"):].split("```")[0]
    argv = command.replace("\\\n", " ").split()[1:]
    out = tmp_path / "again.svg"
    argv[argv.index("-o") + 1] = str(out)
    assert main(argv) == 0

    def shape(path):
        return sorted((g.get("id"), g.get("class")) for g in ET.parse(path).getroot().iter(f"{SVG}g")
                      if (g.get("class") or "").split()[:1] in (["node"], ["cluster"]))

    assert shape(out) == shape(committed)


def test_a_name_written_like_html_is_drawn_as_text():
    graphviz = pytest.importorskip("graphviz")
    from tgraph.view.render import _text

    dot = graphviz.Digraph()
    dot.node("a", label=_text("<b>h.0</b>"))
    svg = dot.pipe(format="svg").decode()
    assert "&lt;b&gt;h.0&lt;/b&gt;" in svg
