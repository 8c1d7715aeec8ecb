"""Two-file writes (``m.onnx`` + ``m.onnx.data``, ``m.py`` + ``m.npz``) are all-or-nothing.

A failed rename keeps the old pair loadable; concurrent writers to one path take turns, so
the main file always names data written by the same run; a writer killed with SIGKILL leaves
temporaries that the next write to the directory removes; SIGTERM cleans up like Ctrl-C.
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from tgraph.cli import main
from tgraph.codegen.numpy import load_numpy_module, write_numpy_module
from tgraph.codegen.onnx import save_onnx
from tgraph.ir import Builder, DType, TensorType

ROOT = Path(__file__).resolve().parents[1]


def weighted_graph(seed=0, n=32):
    """y = x @ w + c: `w` (4 KiB) goes to the companion file (.data / .npz), the small constant `c`
    stays inline in the main file (.onnx / .py), so a main file paired with another run's data shows."""
    b = Builder()
    x = b.graph.add_input("x", TensorType(DType.float32, ("batch", n)))
    w = b.graph.add_constant(np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32), "w",
                             is_param=True, exact_name=True)
    c = b.graph.add_constant(np.full(1, seed + 1, np.float32), "c", exact_name=True)
    b.graph.outputs = [b.op("Add", b.op("MatMul", x, w, hint="xw"), c, hint="y")]
    return b.graph


def expected(seed, x):
    g = weighted_graph(seed, x.shape[1])
    return x @ g.constants["w"].const + g.constants["c"].const


def which_run(outputs_for):
    """The seed whose weights and inline constant both produced these outputs (None: a mixed pair)."""
    x = np.random.default_rng(7).standard_normal((2, 32)).astype(np.float32)
    y = outputs_for(x)
    return next((s for s in (1, 2) if np.allclose(y, expected(s, x), rtol=1e-5, atol=1e-5)), None)


def loaded_weight(path):
    """The weight as the model on disk reads it (through its external-data reference), after the full check."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))


def weight_of(seed):
    return weighted_graph(seed).constants["w"].const


def data_location(path):
    shell = onnx.load(str(path), load_external_data=False)
    (t,) = [t for t in shell.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    return {e.key: e.value for e in t.external_data}["location"]


def names(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# ------------------------------------------------------------------------------ a failed rename
def test_failed_rename_keeps_the_old_onnx_pair_intact_and_loadable(tmp_path, monkeypatch):
    path = save_onnx(weighted_graph(seed=0), tmp_path / "m.onnx", external_data=True)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "m.onnx":
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_onnx(weighted_graph(seed=1), path, external_data=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(loaded_weight(path), weight_of(0))


def test_failed_rename_keeps_the_old_numpy_pair_intact_and_loadable(tmp_path, monkeypatch):
    path = write_numpy_module(weighted_graph(seed=0), tmp_path / "m.py")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "m.py":
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_numpy_module(weighted_graph(seed=1), path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert names(tmp_path) == ["m.npz", "m.py"]
    x = np.ones((1, 32), np.float32)
    np.testing.assert_allclose(load_numpy_module(path).run({"x": x})["y"], expected(0, x), rtol=1e-5)


def test_without_hard_links_the_pair_keeps_its_unique_data_name(tmp_path, monkeypatch):
    path = save_onnx(weighted_graph(seed=0), tmp_path / "m.onnx", external_data=True)

    def no_link(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_link)
    save_onnx(weighted_graph(seed=1), path, external_data=True)
    unique = data_location(path)
    assert unique != "m.onnx.data" and names(tmp_path) == sorted(["m.onnx", unique])   # the old data is gone
    np.testing.assert_array_equal(loaded_weight(path), weight_of(1))
    monkeypatch.undo()
    save_onnx(weighted_graph(seed=2), path, external_data=True)       # back to the usual name
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"] and data_location(path) == "m.onnx.data"
    np.testing.assert_array_equal(loaded_weight(path), weight_of(2))
    save_onnx(weighted_graph(seed=2), path)                             # inline: the old data goes too
    assert names(tmp_path) == ["m.onnx"]


# ------------------------------------------------------------------------------ concurrent writers
def _race(monkeypatch, main_name, write_first, write_second):
    """Run two writes of one path so that the first is about to move its main file into place
    when the second starts; the first waits (up to a second) for the second to finish."""
    second_done, first_waiting = threading.Event(), threading.Event()
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == main_name and threading.current_thread().name == "first" and not first_waiting.is_set():
            first_waiting.set()
            second_done.wait(timeout=1.0)       # without a lock the second write completes in here
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    errors = []

    def run(write, done=None):
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)
        finally:
            if done is not None:
                done.set()

    first = threading.Thread(target=run, args=(write_first,), name="first")
    first.start()
    assert first_waiting.wait(timeout=30)
    second = threading.Thread(target=run, args=(write_second, second_done), name="second")
    second.start()
    first.join(30)
    second.join(30)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not errors, errors


def test_concurrent_onnx_exports_leave_a_consistent_pair(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    _race(monkeypatch, "m.onnx", lambda: save_onnx(weighted_graph(seed=1), path, external_data=True),
          lambda: save_onnx(weighted_graph(seed=2), path, external_data=True))
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    winner = which_run(lambda x: ReferenceEvaluator(str(path)).run(None, {"x": x})[0])
    assert winner is not None, "the .onnx names data written by the other run"
    # ...and both files are exactly what that run alone writes
    alone = save_onnx(weighted_graph(seed=winner), tmp_path / "alone" / "m.onnx", external_data=True)
    assert path.read_bytes() == alone.read_bytes()
    assert path.with_name("m.onnx.data").read_bytes() == alone.with_name("m.onnx.data").read_bytes()


def test_concurrent_numpy_writes_leave_a_consistent_pair(tmp_path, monkeypatch):
    path = tmp_path / "m.py"
    _race(monkeypatch, "m.py", lambda: write_numpy_module(weighted_graph(seed=1), path),
          lambda: write_numpy_module(weighted_graph(seed=2), path))
    assert names(tmp_path) == ["m.npz", "m.py"]
    module = load_numpy_module(path)
    assert which_run(lambda x: module.run({"x": x})["y"]) is not None, "the .py reads the other run's .npz"


# ------------------------------------------------------------------------------ killed writers
_PAUSED_WRITER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
marker = Path({marker!r})
real_fsync = os.fsync

def fsync_then_hang(fd):                 # the data is written; the writer stops before renaming it
    real_fsync(fd)
    marker.write_text(str(os.getpid()))
    time.sleep(120)

os.fsync = fsync_then_hang
{body}
"""


def _start_paused(tmp_path, body):
    marker = tmp_path / "paused"
    script = _PAUSED_WRITER.format(tests=str(ROOT / "tests"), marker=str(marker), body=textwrap.dedent(body))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path,   # imports the tgraph this test does stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"writer did not reach the pause: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def test_temporaries_of_a_sigkilled_writer_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_paused(tmp_path, f"""
        from test_atomic_writes import weighted_graph
        from tgraph.codegen.onnx import save_onnx
        save_onnx(weighted_graph(), {str(out / 'm.onnx')!r}, external_data=True)
        """)
    proc.kill()
    proc.wait()
    left = names(out)
    assert left and all(str(proc.pid) in n or n.endswith(".lock") for n in left)   # recognisably its own
    save_onnx(weighted_graph(), out / "other.onnx")                  # any later write to the directory
    assert names(out) == ["other.onnx"]
    onnx.checker.check_model(str(out / "other.onnx"), full_check=True)


def test_sigterm_during_export_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_paused(tmp_path, f"""
        from tgraph.cli import main
        sys.exit(main(["export", "transformer", "-o", {str(out / 'm.onnx')!r}, "--external-data",
                       "--set", "d_model=16", "--set", "num_heads=2", "--set", "d_ff=16", "--set", "vocab_size=11",
                       "--set", "num_encoder_layers=1", "--set", "num_decoder_layers=1"]))
        """)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err == "tgraph: terminated\n"
    assert names(out) == []


def test_stale_temporaries_of_live_writers_and_other_files_are_kept(tmp_path):
    import tgraph.atomic as atomic

    live = tmp_path / f".m.onnx.tgraph-{os.getppid()}-0123abcd.tmp"     # our parent is alive
    mine = tmp_path / f".m.onnx.tgraph-{os.getpid()}-0123abcd.tmp"      # another thread of ours
    other = tmp_path / ".m.onnx.12345.tmp"                               # not ours: no tgraph tag
    for p in (live, mine, other):
        p.write_bytes(b"x")
    atomic.remove_stale_temps(tmp_path)
    assert names(tmp_path) == sorted(p.name for p in (live, mine, other))


# ------------------------------------------------------------------------------ errors name the user's path
def test_unwritable_output_names_the_users_path(tmp_path, capsys):
    code = main(["export", "transformer", "-o", "/proc/x.onnx", "--set", "d_model=16", "--set", "num_heads=2",
                 "--set", "d_ff=16", "--set", "vocab_size=11", "--set", "num_encoder_layers=1",
                 "--set", "num_decoder_layers=1"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("tgraph: error: cannot write /proc/x.onnx: ") and err.count("\n") == 1
    assert ".tmp" not in err and "tgraph-" not in err
