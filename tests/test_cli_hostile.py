"""Hostile input to the command line: each case one line on stderr naming the input or
field at fault, exit status 2, no traceback, nothing written (issue 8, items 12-14)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tgraph.cli import main

GPT2 = ["gpt2", "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--set", "vocab_size=40",
        "--set", "n_positions=12"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small exported GPT-2 and broken variants of it, plus input files."""
    d = tmp_path_factory.mktemp("hostile")
    assert main(["export", *GPT2, "-o", str(d / "g.onnx")]) == 0
    model = onnx.load(str(d / "g.onnx"))
    next(i for i in model.graph.initializer if i.name == "wte.weight").dims[0] += 3
    onnx.save(model, str(d / "baddims.onnx"))
    model = onnx.load(str(d / "g.onnx"))
    model.graph.input[0].type.tensor_type.elem_type = 999
    onnx.save(model, str(d / "elem999.onnx"))
    (d / "empty.onnx").write_bytes(b"")
    ones = lambda n: np.ones((1, n), np.int64)                       # noqa: E731
    np.savez(d / "missing.npz", attention_mask=ones(4))
    np.savez(d / "oov.npz", input_ids=np.array([[1, 2, 99, 3]]), attention_mask=ones(4))
    np.savez(d / "long.npz", input_ids=ones(20), attention_mask=ones(20))
    return d


CASES = [
    pytest.param(["optimize", "{d}/baddims.onnx", "-o", "{out}"],
                 "initializer 'wte.weight': dims [43, 16] do not match its data", id="initializer-dims"),
    pytest.param(["inspect", "{d}/elem999.onnx"], "graph input 'input_ids' has unknown element type 999",
                 id="element-type-999"),
    pytest.param(["inspect", "{d}/empty.onnx"], "empty.onnx is empty (0 bytes)", id="inspect-empty-file"),
    pytest.param(["optimize", "{d}/empty.onnx", "-o", "{out}"], "empty.onnx is empty (0 bytes)",
                 id="optimize-empty-file"),
    pytest.param(["generate", *GPT2, "--prompt-ids", "1,2", "--seed", "-1"], "--seed must be a non-negative int",
                 id="generate-seed-negative"),
    pytest.param(["export", *GPT2, "-o", "{out}", "--seed", "-1"], "--seed must be a non-negative int",
                 id="export-seed-negative"),
    pytest.param(["run", *GPT2, "--backend", "numpy", "--inputs", "{d}/missing.npz"],
                 "missing input 'input_ids'", id="numpy-missing-input"),
    pytest.param(["run", *GPT2, "--backend", "numpy", "--inputs", "{d}/oov.npz"],
                 "input 'input_ids' (ids into wte.weight): index 99 is outside [-40, 40)", id="numpy-oov-id"),
    pytest.param(["run", *GPT2, "--backend", "numpy", "--inputs", "{d}/long.npz"],
                 "(Gather from wpe.weight): index 12 is outside", id="numpy-longer-than-positions"),
    pytest.param(["run", *GPT2, "--dims", "sequence=16"], "--dims: the model has no dim 'sequence'",
                 id="unknown-dim"),
    pytest.param(["run", "{d}/g.onnx", "--dims", "sequence=16"], "--dims: the model has no dim 'sequence'",
                 id="unknown-dim-onnx-file"),
]


@pytest.mark.parametrize("argv,message", CASES)
def test_hostile_input_is_one_line_exit_2(files, tmp_path, capsys, argv, message):
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capsys, *(a.format(d=files, out=out) for a in argv))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgraph: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == []


def test_max_new_tokens_is_capped_by_the_positions(capsys):
    code, stdout, err = run_cli(capsys, "generate", *GPT2, "--prompt-ids", "1,2,3", "--max-new-tokens", 10**9,
                                "--json")
    assert code == 0, err
    assert "--max-new-tokens 1000000000 capped to 10 (the model has 12 positions, 3 taken" in err
    import json

    assert len(json.loads(stdout)["ids"]) == 10


def test_fp16_run_statistics_are_accumulated_wide(capsys):
    """`tgraph run`'s summary of an fp16 output: squares of |x| > 256 overflow fp16 (std inf)."""
    from tgraph.cli_run import summarise as _summarise

    logits = np.array([[300.0, -300.0, 100.0, -100.0]], np.float16)
    (line,) = _summarise({"logits": logits})
    want = logits.astype(np.float64)
    assert line == f"  logits: float16[1, 4] mean {want.mean():.6g} std {want.std():.6g}"
    code, stdout, err = run_cli(capsys, "run", *GPT2, "--dtype", "float16")
    assert code == 0 and "std inf" not in stdout and "std nan" not in stdout, stdout + err


def test_export_and_inspect_report_the_same_counts(files, capsys):
    code, stdout, err = run_cli(capsys, "export", *GPT2, "-o", files / "again.onnx")
    assert code == 0, err
    wrote = stdout.split("(", 1)[1]
    code, shown, err = run_cli(capsys, "inspect", files / "again.onnx")
    assert code == 0, err
    nodes, params = shown.splitlines()[0].split(": ", 1)[1].split(", ")
    assert f"{params}, {nodes}" in wrote, (wrote, shown.splitlines()[0])
    model = onnx.load(str(files / "again.onnx"))
    assert nodes == f"{len(model.graph.node)} nodes"


def test_inspect_into_a_closed_pipe_is_quiet(files):
    """`tgraph inspect ... | head`: the reader leaves early; no "Broken pipe", no traceback."""
    exe = Path(sys.executable).with_name("tgraph")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tgraph.cli"]
    proc = subprocess.Popen(cmd + ["inspect", str(files / "g.onnx")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()                        # before tgraph writes anything
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Broken pipe" not in err and "BrokenPipeError" not in err and "Traceback" not in err, err
    assert proc.returncode in (0, 141)


def test_optimize_report_of_skip_layer_norm_runs(files, tmp_path, capsys):
    """Item 8: the skip-norm pass's near misses are pattern.NearMiss, like every rewrite's."""
    code, stdout, err = run_cli(capsys, "optimize", files / "g.onnx", "-o", tmp_path / "o.onnx",
                                "--pipeline", "fuse-skip-layer-norm", "--report")
    assert code == 0, err
    assert "fired: fuse-skip-layer-norm" in stdout


def test_skip_norm_near_misses_report_their_rule():
    from tgraph.ir import Builder, DType, TensorType
    from tgraph.passes import optimize

    b = Builder()
    x = b.graph.add_input("x", TensorType(DType.float32, ("batch", 8)))
    gamma = b.const(np.ones(8, np.float32), hint="gamma")
    b.graph.outputs = [b.op("LayerNormalization", b.op("Relu", x), gamma, epsilon=1e-5)]
    result = optimize(b.graph, pipeline="fuse-skip-layer-norm")
    assert result.near_misses() == {"skip-layer-norm": ["at layernormalization: expected Add for relu, found Relu"]}
