"""The command line as a user meets it: happy paths and every kind of bad input.

Bad input must give one line on stderr, a non-zero exit, no traceback and no file.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tgraph.cli import main

SMALL = ["--set", "d_model=32", "--set", "num_heads=4", "--set", "d_ff=64", "--set", "vocab_size=61",
         "--set", "num_encoder_layers=1", "--set", "num_decoder_layers=2"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_then_run_onnx(tmp_path, capsys):
    out = tmp_path / "t.onnx"
    code, stdout, err = run_cli(capsys, "export", "transformer", "-o", str(out), *SMALL)
    assert code == 0, err
    assert out.is_file() and "wrote" in stdout
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    code, stdout, err = run_cli(capsys, "run", str(out), "--dims", "batch=2,seq=5,decoder_seq=3")
    assert code == 0, err
    assert "logits: float32[2, 3, 61]" in stdout


def test_run_check_agrees(capsys):
    code, stdout, err = run_cli(capsys, "run", "transformer", "--check", *SMALL)
    assert code == 0, err
    line = [l for l in stdout.splitlines() if l.startswith("check logits")][0]
    assert float(line.rsplit("=", 1)[1]) <= 1e-4


def test_codegen_numpy_writes_module_and_weights(tmp_path, capsys):
    out = tmp_path / "m.py"
    code, stdout, err = run_cli(capsys, "codegen", "numpy", "transformer", "-o", str(out), *SMALL, "-O", "1")
    assert code == 0, err
    assert out.is_file() and out.with_suffix(".npz").is_file()


def test_inspect_json(capsys):
    code, stdout, err = run_cli(capsys, "inspect", "transformer", "--json", *SMALL, "-O", "0")
    assert code == 0, err
    info = json.loads(stdout)
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "decoder_input_ids", "attention_mask"]
    assert info["outputs"][0]["shape"] == ["batch", "decoder_seq", 61]
    assert info["ops"]["tgraph.CausalMask"] == 2             # one per decoder layer
    assert info["parameters"] > 0


def test_inspect_onnx_file(tmp_path, capsys):
    out = tmp_path / "t.onnx"
    assert run_cli(capsys, "export", "transformer", "-o", str(out), *SMALL)[0] == 0
    code, stdout, err = run_cli(capsys, "inspect", str(out), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["inputs"][0]["shape"] == ["batch", "seq"]
    assert info["parameters"] > 0


def test_user_factory_file(tmp_path, capsys):
    src = tmp_path / "mymodel.py"
    src.write_text(
        "from tgraph.dsl import Module, Linear, InputSpec\n"
        "from tgraph.ir import DType\n"
        "class Tiny(Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.fc = Linear(4, width)\n"
        "    def input_specs(self):\n"
        "        return {'x': InputSpec(DType.float32, ('batch', 4))}\n"
        "    def forward(self, x):\n"
        "        return {'y': self.fc(x).relu()}\n"
        "def make(width=3):\n"
        "    return Tiny(width)\n")
    out = tmp_path / "tiny.onnx"
    code, stdout, err = run_cli(capsys, "export", f"{src}:make", "-o", str(out), "--set", "width=5")
    assert code == 0, err
    model = onnx.load(str(out))
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 5


BAD_INPUTS = [
    (["export", "no_such_model", "-o", "{out}"], "unknown model 'no_such_model'"),
    (["export", "transformer", "-o", "{out}", "--set", "d_model=30", "--set", "num_heads=4"],
     "not divisible by num_heads"),
    (["export", "transformer", "-o", "{out}", "--set", "colour=blue"], "--set colour: TransformerConfig has no such key"),
    (["export", "transformer", "-o", "{out}", "--set", "d_model"], "--set expects key=value"),
    (["export", "missing_file.py:make", "-o", "{out}"], "model file not found"),
    (["export", "{tmp}/nodir/", "-o", "{out}"], "not found or not a model"),
    (["run", "{tmp}/absent.onnx"], "ONNX file not found"),
    (["inspect", "{tmp}/absent.onnx"], "ONNX file not found"),
    (["export", "transformer", "-o", "{out}", "--opset", "5"], "opset"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_is_one_clean_line_and_leaves_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out.onnx"
    argv = [a.format(out=out, tmp=tmp_path) for a in argv]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgraph: error:"), err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == []


def test_console_script_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("tgraph")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tgraph.cli"]
    proc = subprocess.run(cmd + ["export", "transformer", "-o", str(tmp_path / "x.onnx"), "--set", "num_heads=7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not divisible" in proc.stderr
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------- fusion reports
LLAMA_SMALL = ["--set", "d_model=32", "--set", "num_heads=4", "--set", "num_kv_heads=2", "--set", "d_ff=48",
               "--set", "vocab_size=61", "--set", "num_layers=3"]


def test_inspect_json_summarises_fusions(capsys):
    code, stdout, err = run_cli(capsys, "inspect", "llama", "--json", *LLAMA_SMALL)
    assert code == 0, err
    info = json.loads(stdout)
    # 3 layers: one attention, two RMSNorms, q and k rotaries each; plus the final norm
    assert {k: info["fusions"].get(k) for k in ("rms-norm", "rotary", "attention")} == \
        {"rms-norm": 7, "rotary": 6, "attention": 3}
    assert info["ops"]["Attention"] == 3 and info["ops"]["RotaryEmbedding"] == 6
    assert info["passes"]["fuse-attention"]["attention"] == 3
    code, stdout, err = run_cli(capsys, "inspect", "llama", "--json", *LLAMA_SMALL, "-O", "0")
    assert code == 0, err
    assert json.loads(stdout)["fusions"] == {}


def test_inspect_text_shows_fusion_counts(capsys):
    code, stdout, err = run_cli(capsys, "inspect", "transformer", *SMALL)
    assert code == 0, err
    # 1 encoder layer (self-attention) + 2 decoder layers (self + cross): 5 attentions, 1*2 + 2*3 norms
    line = next(l for l in stdout.splitlines() if l.startswith("fusions: "))
    assert {"layer-norm=8", "attention=5"} <= set(line.split()[1:]), line


def test_export_report_shows_fusion_counts(tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "export", "transformer", "-o", str(tmp_path / "t.onnx"), *SMALL, "--report")
    assert code == 0, err
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.strip()}
    assert "attention=5" in rows["fuse-attention"].split()
    assert "attention-merged-heads=5" in rows["fuse-attention"].split()      # all 5 blocks go 3-D
    assert rows["fuse-layer-norm"].endswith("layer-norm=8")
    assert {"layer-norm=8", "attention=5"} <= set(rows["fusions:"].split()[1:])
    code, stdout, err = run_cli(capsys, "export", "transformer", "-o", str(tmp_path / "t0.onnx"), *SMALL,
                                "-O", "0", "--report")
    assert code == 0 and "fusions" not in stdout                  # -O0 runs no pass: nothing to report
