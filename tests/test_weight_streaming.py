"""Checkpoint weights stream from the safetensors file to the ONNX file one tensor at a time.

The weights are lazy (`tgraph.ir.lazy`): memory-mapped views plus the loader's transposes
and slices, the fp16 cast and the QKV packing, computed only as they are written. These
tests check that the bytes are exactly those of an export from ordinary arrays, that no
more than one weight (or row block of one) is materialised at a time (seen through the
`track` hook, not by measuring memory), and that running out of memory or disk is a
one-line error with nothing left on disk.
"""
from __future__ import annotations

import weakref

import numpy as np
import pytest

from tgraph import cli
from tgraph.api import build
from tgraph.codegen.onnx import save_onnx, to_onnx
from tgraph.errors import ExportError
from tgraph.ir import Graph
from tgraph.ir import lazy
from tgraph.ir.lazy import LazyTensor, is_lazy, materialize, track
from tgraph.sources import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A small LLaMA (transposed Linear weights, untied head) and GPT-2 (Q/K/V sliced out of c_attn)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    llama = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     tie_word_embeddings=False)
    gpt2 = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return {"llama": _save(transformers.LlamaForCausalLM(llama), root / "llama"),
            "gpt2": _save(transformers.GPT2LMHeadModel(gpt2), root / "gpt2")}


def _eager_copy(graph: Graph) -> Graph:
    """The same graph with every lazy weight computed into an ordinary array (today's export path)."""
    g = graph.copy()
    for v in g.constants.values():
        v.const = materialize(v.const)
    return g


def _files(path):
    return path.read_bytes() + (path.with_name(path.name + ".data").read_bytes()
                                if path.with_name(path.name + ".data").exists() else b"")


@pytest.mark.parametrize("family,level,dtype", [("llama", 2, "float32"), ("llama", 3, "float16"),
                                                ("gpt2", 3, "float32")])
@pytest.mark.parametrize("external", [True, False])
def test_streamed_export_equals_export_from_arrays_byte_for_byte(checkpoints, tmp_path, monkeypatch, family,
                                                                 level, dtype, external):
    monkeypatch.setattr(lazy, "BLOCK_BYTES", 4096)       # several row blocks per weight
    graph = build(load_model(checkpoints[family]), level=level, dtype=dtype).graph
    assert sum(is_lazy(v.const) for v in graph.constants.values()) >= 10
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    streamed = save_onnx(graph, tmp_path / "a" / "m.onnx", external_data=external)
    eager = save_onnx(_eager_copy(graph), tmp_path / "b" / "m.onnx", external_data=external)
    assert _files(streamed) == _files(eager)
    assert streamed.with_name("m.onnx.data").exists() == external


def test_building_reads_no_weight_and_writing_holds_one_at_a_time(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(lazy, "BLOCK_BYTES", 4096)
    produced, alive, most = [], [0], [0]

    def seen(tensor, array):
        produced.append(tensor.label)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(array, lambda: alive.__setitem__(0, alive[0] - 1))

    with track(seen):
        graph = build(load_model(checkpoints["llama"]), level=3, dtype="float16").graph   # cast + QKV packing
        # loading, optimising and converting read weights only block by block, for the NaN/inf and
        # float16-range checks, and keep none of them
        assert most[0] <= 1 and alive[0] == 0
        weights = [v for v in graph.constants.values() if is_lazy(v.const)]
        save_onnx(graph, tmp_path / "m.onnx", external_data=True)
    assert most[0] == 1                      # one weight (or one row block of one) alive at a time
    assert {w.const.label for w in weights} <= set(produced)
    assert len(produced) > len(weights)      # big weights came in several blocks


def test_lazy_operations_match_numpy():
    base = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2 * 6, 4)
    x = lazy.Constant(base)
    cases = [(x.T, base.T), (x[:, 1:3], base[:, 1:3]), (x.reshape(4, 3, 4)[:, 1], base.reshape(4, 3, 4)[:, 1]),
             (x.astype(np.float16), base.astype(np.float16)),
             (LazyTensor.concatenate([x, base + 1], axis=1), np.concatenate([base, base + 1], axis=1)),
             (x.T.map(lambda a: a * 2, np.float32), base.T * 2)]
    for got, want in cases:
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got.materialize(), want)
        np.testing.assert_array_equal(np.concatenate(list(got.blocks(max_bytes=16)), axis=0), want)
    with pytest.raises(ValueError):
        x.reshape(5, -1)


def test_out_of_memory_while_writing_is_one_line_error(checkpoints, tmp_path, monkeypatch, capsys):
    def no_memory(self):
        raise MemoryError()

    monkeypatch.setattr(lazy.MappedRegion, "_map", no_memory)
    out = tmp_path / "out"
    code = cli.main(["export", checkpoints["llama"], "-o", str(out / "m.onnx"), "--external-data"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "out of memory" in err and "model.safetensors:" in err, err
    assert not out.exists() or list(out.iterdir()) == []


def test_memory_check_refuses_before_allocating(checkpoints, tmp_path, monkeypatch, capsys):
    graph = build(load_model(checkpoints["llama"]), level=0).graph     # (its weight checks read blocks)
    weight = next(v.const for v in graph.constants.values() if is_lazy(v.const) and v.const.size > 1000)
    monkeypatch.setattr(lazy, "CHECK_MEMORY_BYTES", 1)
    monkeypatch.setattr(lazy, "available_memory", lambda: 100)
    monkeypatch.setattr(lazy.MappedRegion, "_map", lambda self: pytest.fail("mapped despite the check"))
    with pytest.raises(lazy.ResourceError, match="out of memory computing .* MiB needed, 0 MiB available"):
        weight.materialize()


def test_full_disk_is_one_line_error_and_leaves_nothing(checkpoints, tmp_path, monkeypatch, capsys):
    import os
    from types import SimpleNamespace

    monkeypatch.setattr(os, "fstatvfs", lambda fd: SimpleNamespace(f_bavail=1, f_frsize=1000))
    code = cli.main(["export", checkpoints["llama"], "-o", str(tmp_path / "m.onnx"), "--external-data"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "not enough disk space" in err, err
    assert list(tmp_path.iterdir()) == []


def test_models_over_the_protobuf_limit_are_refused_not_serialised(tmp_path):
    g = Graph("big")
    x = g.add_input("x", __import__("tgraph").ir.TensorType(__import__("tgraph").ir.DType.float32, (2**29, 4)))
    huge = lazy.Constant(np.broadcast_to(np.zeros((), np.float32), (2**29, 4)))   # 8 GiB described, none held
    w = g.add_constant(huge, hint="w", is_param=True, exact_name=True)
    from tgraph.ir import Node

    y = g.new_value(x.type, "y")
    g.append(Node("Add", [x, w], [y]))
    g.outputs.append(y)
    with pytest.raises(ExportError, match="do not fit in one ONNX protobuf"):
        to_onnx(g)
    with pytest.raises(ExportError, match="over protobuf's 2 GiB limit"):
        save_onnx(g, tmp_path / "m.onnx", external_data=False)
    assert list(tmp_path.iterdir()) == []


def _rewrite_header(src, dst, edit=None, cut=0):
    import json
    import shutil

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    if edit is not None:
        edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + (body[:len(body) - cut] if cut else body))


def _move_last_to_start(header):
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [0, end - begin]


def _first(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("case,edit,cut,expect", [
    ("truncated", None, 10, "but the file has"),
    ("overlap", lambda h: _move_last_to_start(h), 0, "tensor data overlaps"),
    ("dtype", lambda h: h[_first(h)].__setitem__("dtype", "Q7"), 0, "unsupported dtype 'Q7'"),
    ("shape", lambda h: h[_first(h)].__setitem__("shape", [3, "x"]), 0, "malformed shape"),
    ("offsets", lambda h: h[_first(h)].__setitem__("data_offsets", [0, 4]), 0, "do not hold"),
])
def test_corrupt_safetensors_header_is_one_line_error(checkpoints, tmp_path, capsys, case, edit, cut, expect):
    """The header is read by tgraph itself now (only the header: no mapping of the whole file),
    so it checks what the safetensors library checked: dtypes, shapes, offsets covering the data."""
    bad = tmp_path / case
    _rewrite_header(__import__("pathlib").Path(checkpoints["llama"]), bad, edit, cut)
    code = cli.main(["export", str(bad), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "model.safetensors: cannot read safetensors file" in err, err
    if expect:
        assert expect in err
    assert not (tmp_path / "m.onnx").exists()
