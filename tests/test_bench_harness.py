"""raysub.bench.harness: the side-by-side round order, the last-line JSON, the load average and the peak RSS."""
import json

import numpy as np

from raysub.bench import harness


def test_rounds_alternate_two_sides_and_rotate_three():
    """Two sides alternate A B, B A, A B, …; three rotate by one each round (each leads once every three)."""
    assert [order for _, order in harness.rounds(["A", "B"], 4)] == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert [order for _, order in harness.rounds(("A", "B", "C"), 4)] == [
        ["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"], ["A", "B", "C"]]
    assert [r for r, _ in harness.rounds(["A", "B"], 3)] == [0, 1, 2]
    assert harness.rotated([True, False], 1) == [False, True]


def test_figures_are_the_last_line_of_stdout(capsys):
    """Whatever a benchmark printed before, the figures are the last line, one JSON object, exactly as given."""
    print("a table")
    harness.print_figures({"ratio": 0.5, "n": 3, "loadavg": "0.10 0.20 0.30 1/100 42"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a table"
    assert lines[-1] == '{"ratio": 0.5, "n": 3, "loadavg": "0.10 0.20 0.30 1/100 42"}'
    assert json.loads(lines[-1]) == {"ratio": 0.5, "n": 3, "loadavg": "0.10 0.20 0.30 1/100 42"}
    assert harness.figures_line({"x": float("nan")}, allow_nan=True) == '{"x": NaN}'


def test_loadavg_is_the_kernels_line(monkeypatch, tmp_path):
    """/proc/loadavg as written (five fields); "n/a" where there is none."""
    got = harness.loadavg()
    assert got == "n/a" or len(got.split()) == 5
    fake = tmp_path / "loadavg"
    fake.write_text("0.50 0.40 0.30 2/300 1234\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(fake if p == "/proc/loadavg" else p, *a, **k))
    assert harness.loadavg() == "0.50 0.40 0.30 2/300 1234"
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert harness.loadavg() == "n/a"
    assert harness.load_now() >= 0.0


def test_peak_rss_counts_a_freed_buffer():
    """The peak is the kernel's high-water mark: 200 MB written and freed still counts."""
    source = harness.reset_peak_rss()
    assert source in ("vmhwm_since_reset", "vmhwm_lifetime", "ru_maxrss_lifetime")
    before = harness.rss_bytes()
    buf = np.ones(200 * 2**20 // 8)
    assert buf.sum() == buf.size
    del buf
    assert harness.peak_rss_bytes() >= before + 190 * 2**20


def test_one_line_parser_prints_one_line_and_exits_2(capsys):
    """A bad argument is one line naming the job (not argparse's usage block), exit 2: catches a parser that falls
    back to argparse's error (usage + exit 2) or names the script path instead of the job."""
    import pytest

    from raysub.bench.harness import OneLineParser

    p = OneLineParser("cgqn_job", prog="python jobs/cgqn_job.py")
    p.add_argument("--arms")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--nope"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "cgqn_job: error: unrecognized arguments: --nope\n"
