"""The benchmark scripts' own logic (jobs/bench/), without running a benchmark: what they refuse and how they
turn records into figures."""
import importlib.util
import os

import pytest

from raysub.config import load_config
from raysub.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_job(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(REPO, "jobs", "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tta(monkeypatch):
    """jobs/bench/time_to_accuracy.py with a pipeline that must not run (a call fails the test)."""
    from raysub import pipeline

    calls = []

    def run_pipeline(cfg, **kwargs):
        calls.append(kwargs)
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(pipeline, "run_pipeline", run_pipeline)
    module = load_job("time_to_accuracy")
    module.pipeline_calls = calls
    return module


def test_time_to_accuracy_refuses_an_existing_out(tta, tmp_path, capsys):
    """Issue 11 (time_to_accuracy reuses --out): a rerun into an --out that holds a run must not report that run's
    old figures; it is refused with one line naming the directory and the fix, before the pipeline starts."""
    out = tmp_path / "bench_tta"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert tta.main(["--out", str(out), "sgd.epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(out) in err and "--overwrite" in err and "--out" in err
    assert tta.pipeline_calls == []


def test_time_to_accuracy_overwrite_and_resume_reach_the_pipeline(tta, tmp_path):
    """Issue 11: --overwrite starts afresh (the library's overwrite, which clears --out under its lock) and an empty
    --out starts a new run; neither resumes."""
    out = tmp_path / "bench_tta"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(AssertionError, match="the pipeline ran"):
        tta.main(["--out", str(out), "--overwrite"])
    with pytest.raises(AssertionError, match="the pipeline ran"):
        tta.main(["--out", str(tmp_path / "new")])
    assert tta.pipeline_calls == [{"resume": False, "overwrite": True}, {"resume": False, "overwrite": False}]


def test_time_to_accuracy_resume_needs_the_same_config(tta, tmp_path):
    """Issue 11: --resume continues a killed bench only with the config it started with (the library's check)."""
    from raysub.cli import resolve_config

    out = tmp_path / "bench_tta"
    cfg = load_config(resolve_config("fashion_mnist_lenet"), tta.DEFAULTS + [f"run_dir={out}"])
    out.mkdir()
    (out / "config.yaml").write_text(cfg.to_yaml())  # what a killed bench leaves
    same = load_config(resolve_config("fashion_mnist_lenet"), tta.DEFAULTS + [f"run_dir={out}"])
    tta.check_out(same, resume=True, overwrite=False)
    other = load_config(resolve_config("fashion_mnist_lenet"), tta.DEFAULTS + [f"run_dir={out}", "sgd.epochs=3"])
    with pytest.raises(ConfigError, match="sgd.epochs"):
        tta.check_out(other, resume=True, overwrite=False)


def block(peak, start=100, nbytes=1000):
    return {"peak_rss": peak, "start_rss": start, "block_bytes": nbytes, "peak_rss_source": "vmhwm_since_reset"}


def test_basis_bench_compares_the_reference_with_all_block_actors():
    """Issue 11 (basis bench, reference_over_raysub_ram): every block actor holds its block at once, so the
    reference's peak RSS is compared with the sum of the actors' peaks, not with one actor's."""
    bench = load_job("basis")
    mem = bench.raysub_memory([block(1500), block(1300), block(1200, start=200), block(1400)])
    assert mem["raysub_peak_rss_sum_bytes"] == 5400
    assert mem["raysub_actor_peak_rss_bytes_all"] == [1500, 1300, 1200, 1400]
    assert mem["raysub_actor_peak_rss_bytes"] == 1500
    assert mem["peak_ram_over_block"] == pytest.approx(1.4)  # per actor: (peak - start) / its block, the largest
    assert mem["peak_rss_over_block_abs"] == pytest.approx(1.5)
    assert mem["raysub_peak_rss_source"] == ["vmhwm_since_reset"]
    assert bench.reference_over_raysub_ram(10800, mem) == pytest.approx(2.0)
