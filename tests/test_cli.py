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


# ---------------------------------------------------------------- discoverability (issue 13, item 4)
def usage_error(capsys, *argv) -> str:
    """A usage mistake: exit status 2 and one line `tgraph: error: ...` on stderr, nothing on stdout."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.startswith("tgraph: error: ") and err.count("\n") == 1, err
    return err


def test_help_points_at_every_config_key(capsys):
    for command in ("export", "run", "inspect", "codegen", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"] if command != "codegen" else [command, "numpy", "--help"])
        assert "tgraph config MODEL" in " ".join(capsys.readouterr().out.split()), command
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for command in ("models", "config", "passes", "doctor"):
        assert command in text
    for flag in ("--version", "--debug", "--verbose", "--quiet"):
        assert flag in text


def test_version_flag(capsys):
    import tgraph

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"tgraph {tgraph.__version__} ")


def relu_model():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("argv, suggestion", [
    (["export", "gtp2", "-o", "x.onnx"], "did you mean 'gpt2'?"),                       # model name
    (["exprot", "gpt2", "-o", "x.onnx"], "did you mean 'export'?"),                     # subcommand
    (["gtp2"], "looks like the model 'gpt2': give a command first, e.g. `tgraph run gpt2`"),  # model, no command
    (["export", "gpt2", "-o", "x.onnx", "--fp16"], "did you mean --dtype float16?"),     # flag
    (["export", "gpt2", "-o", "x.onnx", "--dtype", "fp16"], "did you mean 'float16'?"),  # a flag's value
    (["generate", "gpt2", "--prompt-ids", "1", "--max-new-tokns", "3"], "did you mean --max-new-tokens?"),
    (["export", "t5", "-o", "x.onnx", "--use-cache"], "did you mean --set use_cache=VALUE?"),   # a config key as a flag
    (["export", "gpt2", "-o", "x.onnx", "--set", "n_embed=32"], "did you mean 'n_embd'?"),        # a config key
    (["optimize", "in.onnx", "-o", "x.onnx", "--pipeline", "dse"], "did you mean 'dce'?"),        # a pass
])
def test_did_you_mean(tmp_path, capsys, monkeypatch, argv, suggestion):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "optimize":
        onnx.save(relu_model(), "in.onnx")
    try:
        code = main(argv)                  # a mistake found by tgraph
    except SystemExit as e:                # a usage mistake found by the parser
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("tgraph: error: ") and err.count("\n") == 1, err
    assert suggestion in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("argv, suggestion", [
    (["generate", "gpt2", "--prompt-ids", "1", "--max-new-token", "3"], "did you mean --max-new-tokens?"),
    (["export", "gpt2", "-o", "x.onnx", "--max-lengt=64"], "did you mean --max-length?"),
    (["--verb", "export", "gpt2", "-o", "x.onnx"], "unrecognized arguments: --verb"),
])
def test_a_flag_prefix_is_refused_not_completed(tmp_path, capsys, monkeypatch, argv, suggestion):
    """A unique prefix is an error (argparse completes it by default): it would change meaning
    the day a second flag with that prefix is added."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("tgraph: error: ") and err.count("\n") == 1, err
    assert suggestion in err
    assert not (tmp_path / "x.onnx").exists()


def test_no_parser_completes_abbreviations():
    """Every parser, including the nested ones other modules add (deploy triton), refuses prefixes."""
    from tgraph.cli import build_parser
    from tgraph.cli_args import _subparsers

    stack, seen = [build_parser()], []
    while stack:
        parser = stack.pop()
        seen.append(parser.prog)
        assert parser.allow_abbrev is False, parser.prog
        stack.extend(_subparsers(parser).values())
    assert "tgraph deploy triton" in seen and "tgraph generate" in seen


def test_no_suggestion_for_nonsense(capsys):
    err = usage_error(capsys, "zzzzqq")
    assert "did you mean" not in err and "invalid choice: 'zzzzqq'" in err


def test_usage_errors_are_one_line(capsys):
    assert "the following arguments are required: -o/--output" in usage_error(capsys, "export", "gpt2")
    assert "-O" in usage_error(capsys, "export", "gpt2", "-o", "x.onnx", "-O", "7")


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_flags_anywhere(where, tmp_path):
    from tgraph.cli import build_parser

    import argparse

    parser = build_parser()
    flags = ["--debug", "--quiet", "--verbose", "--print-ir-after-all"]
    rest = ["export", "gpt2", "-o", "x.onnx"]
    args = parser.parse_args(flags + rest if where == "before" else rest + flags)
    assert (args.debug, args.quiet, args.verbose, args.print_ir_after_all) == (True, True, True, True)
    args = parser.parse_args(rest)
    assert (args.debug, args.quiet, args.verbose, args.print_ir_after_all) == (False, False, False, False)
    args = parser.parse_args(["-q", "generate", "gpt2", "-v", "--prompt-ids", "1"])
    assert args.quiet and args.verbose and not args.debug
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, subparser in sub.choices.items():            # every subcommand, those added later too
        assert {"--debug", "--quiet", "--verbose"} <= set(subparser._option_string_actions), command


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, capsys):
    from tgraph.errors import ConfigError

    out = str(tmp_path / "x.onnx")
    for argv in (["--debug", "export", "gtp2", "-o", out], ["export", "gtp2", "-o", out, "--debug"]):
        with pytest.raises(ConfigError, match="unknown model 'gtp2'"):
            main(argv)
    code, _, err = run_cli(capsys, "export", "gtp2", "-o", out)
    assert code == 2 and "Traceback" not in err


def test_config_check_messages_use_the_cli_spelling(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "t5", "-o", str(tmp_path / "x.onnx"), "--set", "use_cache=true")
    assert code == 2
    assert "--set part=decoder" in err and "part='decoder'" not in err and "True" not in err
    code, _, err = run_cli(capsys, "export", "gpt2", "-o", str(tmp_path / "x.onnx"), "--set", "use_position_ids=true")
    assert code == 2 and "--set use_position_ids=true needs --set use_cache=true" in err


def test_print_ir_after_all_goes_to_stderr_after_every_pass(tmp_path, capsys):
    from tgraph.passes import level_pipeline

    src = tmp_path / "t.onnx"
    assert run_cli(capsys, "export", "transformer", "-o", str(src), *SMALL, "-O", "0")[0] == 0
    code, out, err = run_cli(capsys, "optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--print-ir-after-all")
    assert code == 0, err
    headers = [l for l in err.splitlines() if l.startswith("// ----- ")]
    assert headers[0] == "// ----- IR before passes -----"
    assert [h.split()[4] for h in headers[1:]] == level_pipeline(2)
    assert "IR after" not in out
    code, out, err = run_cli(capsys, "optimize", str(src), "-o", str(tmp_path / "o.onnx"))
    assert code == 0 and "IR after" not in err


def test_run_and_generate_name_the_provider_in_one_short_line(capsys):
    from tgraph.runtime import Session

    gpt2 = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "vocab_size=61",
            "--set", "n_positions=32"]
    code, out, err = run_cli(capsys, "generate", "gpt2", *gpt2, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert " on " in last and ("CPUExecutionProvider" in last or "CUDAExecutionProvider" in last)
    assert "failed to load" not in out + err and "cannot open" not in out + err and len(last) < 120
    # with --verbose, why CUDA is not in use (if it is not) is one note on stderr; the reference is a Session
    reason = Session(relu_model()).fallback_reason()
    code, out, err = run_cli(capsys, "generate", "gpt2", *gpt2, "--prompt-ids", "1,2", "--max-new-tokens", "2",
                             "--verbose")
    assert code == 0, err
    notes = [l for l in err.splitlines() if l.startswith("tgraph: note: CUDA not used: ")]
    assert notes == ([f"tgraph: note: CUDA not used: {reason}"] if reason else [])
    code, out, err = run_cli(capsys, "run", "gpt2", *gpt2)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("onnxruntime on "))
    assert "failed to load" not in line and len(line) < 120
