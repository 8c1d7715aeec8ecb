"""README's "Using it" block runs as written, top to bottom, in a fresh directory.

Each line is run by bash in a temporary directory that holds only a link to examples/ (as the
repository root would), with this venv's bin/ first on PATH (the README says to activate it).
Lines run two at a time where no earlier line writes a file they read (the first line, which
makes the checkpoints, runs before all others), so the block stays within the test budget.
Progress is forced on (TGRAPH_PROGRESS=1) so every phase's bar is drawn to stderr too, and the
JSON lines must still print JSON alone.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def readme_block() -> list:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def _words(line: str) -> list:
    return shlex.split(line, comments=True)


def _outputs(line: str) -> set:
    words = _words(line)
    return {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-o", "--output", ">")}


def _reads(line: str, path: str) -> bool:
    """Does `line` name `path` (or a file under it) as a word?"""
    name = path.removeprefix("./")
    return any(w.removeprefix("./") == name or w.removeprefix("./").startswith(name + "/") for w in _words(line))


def test_using_it_block_runs_as_written(tmp_path):
    lines = readme_block()
    assert lines[0].startswith("python examples/make_checkpoints.py"), "the block must first make its inputs"
    assert len(lines) >= 15
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TGRAPH_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    def run(line: str) -> tuple:
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        return line, proc

    def check(line, proc) -> None:
        assert proc.returncode == 0, f"`{line}` exited {proc.returncode}:\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr, f"`{line}`:\n{proc.stderr[-2000:]}"
        if "--json" in _words(line) and ">" not in _words(line):
            json.loads(proc.stdout)             # JSON alone on stdout, progress or not

    check(*run(lines[0]))
    done, pending = {}, list(lines[1:])
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {}
        while pending or futures:
            for line in list(pending):          # start every line whose inputs are written
                writers = [w for w in lines[1:lines.index(line)] if any(_reads(line, o) for o in _outputs(w))]
                if all(w in done for w in writers) and len(futures) < 2:
                    futures[line] = pool.submit(run, line)
                    pending.remove(line)
            finished, _ = wait(futures.values(), return_when=FIRST_COMPLETED)
            for future in finished:
                line, proc = future.result()
                del futures[line]
                check(line, proc)
                done[line] = proc

    # what the new lines leave behind: sentence embeddings of unit length, logits as JSON
    emb = np.load(tmp_path / "emb.npz")["embeddings"]
    assert emb.shape == (2, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    doc = json.loads((tmp_path / "logits.json").read_text())
    logits = np.array(doc["outputs"]["logits"]["values"])
    assert list(logits.shape) == doc["outputs"]["logits"]["shape"] and logits.shape[0] == 1
    stream = next(p for l, p in done.items() if "--stream" in l)
    assert "20 new tokens" in stream.stdout


def test_a_missing_model_path_is_worded_alike_by_every_command(tmp_path, capsys):
    """`export` and `generate` (and `run`, `inspect`) name a checkpoint path that is not there in one way."""
    from tgraph.cli import main

    missing = str(tmp_path / "my-gpt2-checkpoint")
    lines = set()
    for argv in (["export", missing, "-o", str(tmp_path / "x.onnx")], ["generate", missing, "--prompt", "hi"],
                 ["run", missing], ["inspect", missing], ["generate", "./nowhere", "--prompt-ids", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("tgraph: error: not found or not a model: "), err
        lines.add(err.replace(missing, "PATH").replace("./nowhere", "PATH"))
    assert len(lines) == 1, lines
