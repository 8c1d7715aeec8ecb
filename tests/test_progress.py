"""tgraph.progress: every long phase is drawn (tqdm, stderr), timed for --report, hidden by
--quiet and --json, and closed before an error is reported."""
import json
import threading
import time

import pytest

from tgraph import progress
from tgraph.cli import main


@pytest.fixture
def fast(monkeypatch):
    """Progress forced on (stderr is no terminal under pytest) and drawn after 50 ms, not 1 s."""
    monkeypatch.setenv("TGRAPH_PROGRESS", "1")
    monkeypatch.setattr(progress, "DELAY_S", 0.05)
    monkeypatch.setattr(progress, "TICK_S", 0.01)
    progress.configure(quiet=False)
    progress.reset_timings()
    yield
    progress.configure(quiet=False)


def test_a_long_phase_is_drawn_and_stays_a_short_one_is_not(fast, capsys):
    with progress.phase("quick"):
        pass
    assert capsys.readouterr().err == ""
    with progress.phase("slow step"):
        time.sleep(0.2)                      # one blocking call: the ticker redraws the elapsed time
    err = capsys.readouterr().err
    assert "slow step: 00:00" in err and err.endswith("\n"), repr(err)     # left on screen, own line
    names = [n for n, _ in progress.timings()]
    assert names == ["quick", "slow step"] and progress.timings()[1][1] >= 0.2


def test_bars_count_and_nested_phases_are_reported_under_their_parent(fast, capsys):
    with progress.phase("outer"):
        with progress.phase("inner", total=3, unit="tensor") as bar:
            for _ in range(3):
                time.sleep(0.03)
                bar.update(1)
    assert "3/3" in capsys.readouterr().err
    assert [n for n, _ in progress.timings()] == ["  inner", "outer"]
    assert progress.timings_line().startswith("phases: outer ") and "inner" not in progress.timings_line()


def test_quiet_and_tgraph_progress_0_draw_nothing_but_still_time(fast, capsys, monkeypatch):
    progress.configure(quiet=True)
    with progress.phase("hidden"):
        time.sleep(0.1)
    monkeypatch.setenv("TGRAPH_PROGRESS", "0")
    progress.configure(quiet=False)
    with progress.phase("also hidden"):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""
    assert [n for n, _ in progress.timings()] == ["hidden", "also hidden"]


def test_an_error_closes_the_bar_and_stops_its_ticker(fast, capsys):
    before = threading.active_count()
    with pytest.raises(ValueError):
        with progress.phase("doomed"):
            time.sleep(0.1)
            raise ValueError("boom")
    assert threading.active_count() == before
    err = capsys.readouterr().err
    time.sleep(0.05)
    assert capsys.readouterr().err == "" and err.endswith("\n")       # nothing drawn after the phase
    assert progress.timings()[-1][0] == "doomed"


SMALL_GPT2 = ["gpt2", "--set", "n_embd=32", "--set", "n_layer=2", "--set", "n_head=4", "--set", "vocab_size=97",
              "--set", "n_positions=32"]


def test_export_draws_each_phase_and_reports_their_times(fast, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)          # draw every phase, however short
    out = tmp_path / "g.onnx"
    assert main(["export", *SMALL_GPT2, "-o", str(out), "--report"]) == 0
    stdout, err = capsys.readouterr()
    for name in ("load", "trace", "passes", "write g.onnx"):
        assert f"{name}: " in err or f"{name}:" in err, (name, err)
    line = [line for line in stdout.splitlines() if line.startswith("phases: ")][0]
    assert [part.split()[0] for part in line[len("phases: "):].split(", ")][:3] == ["load", "trace", "passes"]
    assert main(["--quiet", "export", *SMALL_GPT2, "-o", str(out)]) == 0
    assert capsys.readouterr().err == ""


def test_json_output_has_no_progress_and_generation_has_a_token_bar(fast, capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    assert main(["run", *SMALL_GPT2, "--json"]) == 0
    stdout, err = capsys.readouterr()
    json.loads(stdout)
    assert "trace:" not in err and "onnxruntime session:" not in err
    assert main(["generate", *SMALL_GPT2, "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "generate: 100%" in err and "5/5" in err, err
    assert main(["generate", *SMALL_GPT2, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--stream"]) == 0
    assert "generate:" not in capsys.readouterr().err       # the streamed tokens are the progress


def test_a_cli_command_does_not_leave_its_quiet_setting_behind(fast, tmp_path, capsys):
    assert main(["--quiet", "export", *SMALL_GPT2, "-o", str(tmp_path / "q.onnx")]) == 0
    capsys.readouterr()
    assert progress.enabled()                # the library's own progress is as it was
