"""bench/gpu_generate.py's plumbing, on the CPU: export, placement, CUDA-graph decision, log
parsing, bandwidth arithmetic and the one-line report for a dtype the provider cannot run."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_generate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pure_parts(bench):
    log = ("[I] GraphTransformer GroupQueryAttentionFusion modified: 0\n"
           "[V] ONNX Attention: using flash attention kernel\n"
           "[V] GroupQueryAttention: memory efficient attention selected\n"
           "[V] ONNX Attention: using flash attention kernel\n")
    assert bench.kernel_lines(log) == ["[V] ONNX Attention: using flash attention kernel",
                                       "[V] GroupQueryAttention: memory efficient attention selected"]
    assert bench.placement_counts({"a": "CUDA", "b": "CPU", "c": "CUDA"}) == {"CUDA": 2, "CPU": 1}
    assert bench.decode_bytes(1000, 2, 4, 8, 2, 3, 10) == 1000 + 2 * 2 * 4 * 8 * 2 * 3 * 10


def test_one_command_runs_on_the_cpu(bench, capsys):
    report = bench.main(["--provider", "cpu", "--tiny", "--dtypes", "float16,bfloat16", "--new", "3", "--reps", "1",
                         "--max-length", "48"])
    fp16, bf16 = report["results"]
    assert fp16["placement"] == {"CPUExecutionProvider": sum(fp16["placement"].values())}
    assert fp16["cuda_graph"]["enable"] is False and "cpu" in fp16["cuda_graph"]["reason"]
    assert [(p["prompt"], p["batch"]) for p in fp16["points"]] == [(32, 1), (32, 8)]    # 1024 does not fit in 48
    assert all(p["decode_ms_per_step"] > 0 and p["bytes_per_step"] > 0 for p in fp16["points"])
    assert "bfloat16" in bf16["error"] and "\n" not in bf16["error"]
    out = capsys.readouterr().out
    assert "bfloat16: not run:" in out and "CUDA graph off" in out
