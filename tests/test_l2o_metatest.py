"""Meta-testing (raysub.l2o.metatest, jobs/l2o_meta_test.py): hand-computed pins of the smoothing, the steps to a
target and VeLO's speedup (with its never-reached lower bound), the lr pick on validation only, the mean ± std
summary, one run's step semantics against meta-training's optimizee, divergence, and a tiny end-to-end job run."""
import json
import math
import os

import pytest
import torch

from raysub.cli import QUICKSTART
from raysub.config import load_config
from raysub.l2o import metatest
from raysub.l2o.metatest import pick_lr
from raysub.metrics import mean_std, smoothed, speedup, steps_to_reach, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.val_fraction=0.2", "train.projection=dense", "train.dim=10", "data.augment=false",
        "train.batch_size=128", "l2o.hidden_size=4"]


@pytest.fixture
def one_thread():
    """One intra-op thread (on a busy 2-core machine two spinning threads make tiny steps ~100× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- pure helpers ----------------------------------------------------------------------------------------

def test_smoothed_is_a_trailing_mean_with_partial_start():
    """Catches an EMA or a centred window, dividing by the full window from the start, an off-by-one window."""
    assert smoothed([4, 2, 6, 0, 8], window=2) == [4, 3, 4, 3, 4]
    assert smoothed([4, 2, 6, 0, 8], window=3) == pytest.approx([4, 3, 4, 8 / 3, 14 / 3])
    assert smoothed([1.0] * 30) == [1.0] * 30  # the default window (20) keeps a constant constant
    assert math.isnan(smoothed([1, float("nan"), 1], window=2)[2])  # non-finite propagates, not skipped


def test_steps_to_reach_is_one_based_and_inclusive():
    """Catches a 0-based step, a strict < instead of ≤, and 0 instead of None for never."""
    assert steps_to_reach([5, 4, 3, 2], 3) == 3
    assert steps_to_reach([5, 4, 3, 2], 3.5) == 3
    assert steps_to_reach([5, 4, 3, 2], 5) == 1
    assert steps_to_reach([5, 4, 3, 2], 1) is None


def test_speedup_hand_computed():
    """Catches a raw (unsmoothed) target or curve, φ's loss at index n instead of n−1, a wrong denominator."""
    l2o, mom = [3, 2, 1, 1], [3, 2.5, 2, 1.5, 1]
    assert speedup(l2o, mom, 2, window=1) == {"value": 1.5, "lower_bound": False, "target": 2, "momentum_steps": 3}
    assert speedup(l2o, mom, 3, window=1)["value"] == pytest.approx(5 / 3)
    # window 2: φ smoothed [4, 3, 2, 1] → target 3 at n=2; Momentum† [6, 2, 4, 0] smoothed [6, 4, 3, 2] reaches
    # it at step 3 (1.5). A raw target (2) or φ's index n (2) would give step 4 (2.0); a raw Momentum† curve step 2
    s = speedup([4, 2, 2, 0], [6, 2, 4, 0], 2, window=2)
    assert (s["target"], s["momentum_steps"], s["value"]) == (3, 3, 1.5)


def test_speedup_never_reached_is_a_flagged_lower_bound():
    """Catches None/inf/0 for 'Momentum† never got there', or len/n returned without the ≥ flag."""
    s = speedup([1.0] * 4, [5.0] * 10, 4, window=1)
    assert s == {"value": 2.5, "lower_bound": True, "target": 1.0, "momentum_steps": None}


def test_speedup_of_a_diverged_l2o_is_zero():
    """Catches a nan target silently read as 'never reached' (a lower bound that rewards divergence)."""
    assert speedup([1.0, 1.0], [5.0] * 10, 4)["value"] == 0.0  # φ's run ended before n
    s = speedup([1.0, 1.0, 1.0, float("nan")], [5.0] * 10, 4, window=1)  # diverged exactly at n
    assert (s["value"], s["lower_bound"]) == (0.0, False)


def test_mean_std_is_the_sample_std():
    """Catches the population std (ddof 0) and a crash on one seed."""
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0}
    assert mean_std([7.0]) == {"mean": 7.0, "std": 0.0}


def test_summarize_counts_unconverged_runs_at_their_length():
    """Catches dropping unconverged runs (mean 15 instead of 30), population std, a missing not_converged count."""
    runs = [{"convergence_step": 10, "steps": 60, "test_acc": 0.9, "val_acc": 0.8, "diverged": False},
            {"convergence_step": 20, "steps": 60, "test_acc": 0.8, "val_acc": 0.8, "diverged": False},
            {"convergence_step": None, "steps": 60, "test_acc": 0.7, "val_acc": 0.8, "diverged": True}]
    s = summarize(runs)
    assert s["convergence_step"] == {"mean": 30.0, "std": pytest.approx(math.sqrt(700))}
    assert s["not_converged"] == 1 and s["diverged"] == 1
    assert s["test_acc"]["mean"] == pytest.approx(0.8) and s["test_acc"]["std"] == pytest.approx(0.1)


def test_pick_lr_reads_validation_only_and_averages_seeds():
    """Catches picking by test accuracy, by the best or the first seed instead of the mean over seeds, and
    running other seeds than the validation ones."""
    val = {(0.1, 1): 0.9, (0.1, 2): 0.1, (1.0, 1): 0.6, (1.0, 2): 0.6, (3.0, 1): 0.2, (3.0, 2): 0.2}
    calls = []

    def runner(lr, seed):
        calls.append((lr, seed))
        test = 0.99 if lr == 0.1 else 0.1  # test disagrees: it would pick 0.1
        return {"val_acc": val[(lr, seed)], "test_acc": test, "losses": [1.0], "diverged": False}

    out = pick_lr([0.1, 1.0, 3.0], runner, seeds=[1, 2])
    assert out["lr"] == 1.0 and not out["at_edge"]
    assert sorted(calls) == sorted(val)
    assert [r["val_acc"] for r in out["rows"]] == pytest.approx([0.5, 0.6, 0.2])


def test_pick_lr_ties_go_to_the_lower_final_loss_and_edges_are_flagged():
    """Catches a tie broken by grid order or by the higher loss; a diverged (nan) run winning a tie at 0; a pick
    at the grid's edge not flagged."""
    runs = {0.1: ([2.0] * 20 + [1.0] * 20, False), 1.0: ([2.0] * 40, False), 3.0: ([2.0, float("nan")], True)}

    def runner(lr, seed):
        losses, diverged = runs[lr]
        return {"val_acc": 0.0 if diverged else 0.5, "losses": losses, "diverged": diverged}

    out = pick_lr([1.0, 0.1, 3.0], runner, seeds=[7])
    assert out["lr"] == 0.1 and out["at_edge"]
    assert [r["final_loss"] for r in out["rows"]] == [2.0, 1.0, math.inf]
    assert [r["diverged"] for r in out["rows"]] == [0, 0, 1]
    only_diverged = pick_lr([3.0, 1.0], lambda lr, s: {"val_acc": 0.0, "losses": runs[lr][0], "diverged": lr == 3.0},
                            seeds=[7])
    assert only_diverged["lr"] == 1.0


# -- one run ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_task(tmp_path_factory):
    from raysub.data import open_dataset
    from raysub.engine.task import build_task

    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path_factory.mktemp('mt') / 'run'}", *TINY, "l2o.z0_std=0.5"])
    return cfg, build_task(cfg, data=open_dataset(cfg))


def test_run_matches_meta_trainings_optimizee_and_sgd_by_hand(digits_task, one_thread):
    """The same optimizee as meta-training's (z0, batch order across an epoch boundary) and the registry's SGD
    step z −= lr·Pᵀ∇L. Catches another seed or z0 derivation (meta-test would then not be 'new optimizees of the
    same distribution'), a batch order that drifts from `Optimizee.next_batches`, a skipped or doubled step."""
    from raysub.engine.task import loss_and_projected_grad
    from raysub.l2o.optimizee import Optimizee
    from raysub.l2o.seeds import optimizee_seed
    from raysub.l2o.setup import opt_config

    cfg, task = digits_task
    serial = metatest.METATEST_SERIAL + 3
    seed = optimizee_seed(cfg, serial)
    ref = Optimizee(cfg, task, serial, opt_config(cfg))
    torch.testing.assert_close(metatest.start_z(task, seed, cfg.l2o.z0_std), ref.z)
    steps = task.data.size("train") // 128 + 2  # into the second epoch
    batches = ref.next_batches(steps)
    stream = metatest.batch_stream(task, cfg, seed)
    for x, y in batches:
        x2, y2 = next(stream)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    z, lr, losses = ref.z.clone(), 0.5, []
    for b in batches:
        loss, g = loss_and_projected_grad(task, z, b)
        losses.append(float(loss))
        z = z - lr * g
    r = metatest.run_optimizee(cfg, task, "sgd", lr, {}, seed, cfg.l2o.z0_std, steps, splits=("val",))
    assert r["losses"] == pytest.approx(losses, rel=1e-5)
    torch.testing.assert_close(r["z"], z, rtol=1e-4, atol=1e-5)
    assert set(r["evals"]) == {str(steps)} and "test_acc" not in r and 0 < r["val_acc"] <= 1


def test_divergence_stops_and_scores_zero(digits_task, one_thread):
    """Catches a run that goes on after a non-finite loss, keeps a (meaningless) accuracy, or a convergence step."""
    cfg, task = digits_task
    r = metatest.run_optimizee(cfg, task, "sgd", 1e30, {}, 5, 0.0, 20, eval_at=[10])
    assert r["diverged"] and r["diverged_at"] == len(r["losses"]) < 20
    assert not math.isfinite(r["losses"][-1])
    assert r["test_acc"] == r["val_acc"] == 0.0 and r["evals"]["10"]["test_acc"] == 0.0
    assert r["convergence_step"] is None


# -- the job end to end ----------------------------------------------------------------------------------

def _job():
    from raysub.bench import meta_test_job

    return meta_test_job


def test_job_end_to_end_on_digits_never_reads_test_to_choose(tmp_path, capsys, monkeypatch, one_thread):
    """jobs/l2o_meta_test.py on digits (dense d 10, N 30, horizons 1,2, 2 seeds, 2-point grids, a hand-built φ):
    the JSON's keys, the files, and every evaluation of test happens on a meta-test optimizee (the lr pick and
    its validation optimizees only read val). Catches the lr pick reading test, validation and meta-test
    optimizees that overlap, a missing metric, a job that writes no plot or table."""
    import raysub.engine.task as engine_task
    from raysub.l2o.lstm import LearnedOptimizerConfig, adam_like_params
    from raysub.l2o.weights import save_learned_optimizer

    config = LearnedOptimizerConfig(hidden_size=4, step_scale=0.1)
    weights = str(tmp_path / "weights.pt")
    save_learned_optimizer(weights, config, adam_like_params(config))
    seen, current = [], {}
    real_eval, real_run = engine_task.evaluate_task, metatest.run_optimizee

    def spy_eval(task, z, split, *a, **k):
        seen.append((current["seed"], split))
        return real_eval(task, z, split, *a, **k)

    def spy_run(cfg, task, name, lr, options, seed, *a, **k):
        current["seed"] = seed
        return real_run(cfg, task, name, lr, options, seed, *a, **k)

    monkeypatch.setattr(engine_task, "evaluate_task", spy_eval)
    monkeypatch.setattr(metatest, "run_optimizee", spy_run)
    out = tmp_path / "mt"
    args = ["quickstart", *TINY, "--weights", weights, "--steps", "30", "--horizons", "1,2", "--seeds", "2",
            "--val-seeds", "1", "--lr-grid", "psgd=0.3,1", "--lr-grid", "adam=0.03,0.1", "--lr-grid", "sgd=1,3",
            "--out", str(out)]
    assert _job().main(args) == 0
    head = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("l2o_over_momentum_steps", "l2o_speedup_over_momentum", "l2o_speedup_over_momentum_2n",
                "acc_gap_pts", "seeds", "l2o_speedup_over_momentum_lower_bound", "lrs"):
        assert key in head, key
    assert head["seeds"] == 2 and set(head["lrs"]) == {"psgd", "adam", "sgd"}
    record = json.loads((out / "meta_test.json").read_text())
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "config.yaml").exists()
    assert not set(record["val_seeds"]) & set(record["seeds"])
    assert {s for s, split in seen if split == "test"} == set(record["seeds"])
    assert {split for s, split in seen if s in record["val_seeds"]} == {"val"}
    for name, o in record["optimizers"].items():
        assert [r["seed"] for r in o["runs"]] == record["seeds"] and len(o["runs"][0]["losses"]) == 60
        assert set(o["runs"][0]["evals"]) == {"30", "60"}
    assert record["optimizers"]["psgd"]["lr"] == record["lr_selection"]["psgd"]["lr"]
    # a second run into the same DIR is refused; the transfer table reads the records back
    assert _job().main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert _job().main(["--table", str(out / "meta_test.json"), str(out / "meta_test.json")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 4 and table[2].startswith("| ?") and "digits mlp dense d=10" in table[2]


def test_job_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Catches problems reported one at a time, a traceback, or an output directory created before the checks."""
    out = tmp_path / "bad"
    rc = _job().main(["quickstart", "train.projection=dense", "train.dim=10", "--weights", str(tmp_path / "none.pt"),
                      "--lr-grid", "nosuch=1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "val_fraction" in err and "--weights" in err and "nosuch" in err
    assert not out.exists()


# -- issue 27: schedules tuned for the run's length, the weights' run -------------------------------------------

def test_schedule_lr_hand_computed():
    """8 steps at lr 2: cosine starts at lr and halves at the middle step; step decays ×0.1 after half the run and
    ×0.01 after three quarters. Catches a cosine that starts below lr (step counted from 1 inside the cosine), a
    decay one step early or late, a schedule over another length than the run's."""
    assert [metatest.schedule_lr("constant", 2.0, s, 8) for s in (1, 8)] == [2.0, 2.0]
    assert metatest.schedule_lr("cosine", 2.0, 1, 8) == 2.0
    assert metatest.schedule_lr("cosine", 2.0, 5, 8) == pytest.approx(1.0)
    assert metatest.schedule_lr("cosine", 2.0, 8, 8) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert [metatest.schedule_lr("step", 2.0, s, 8) for s in range(1, 9)] == pytest.approx(
        [2.0] * 4 + [0.2] * 2 + [0.02] * 2)
    with pytest.raises(ValueError, match="cosine"):
        metatest.schedule_lr("linear", 1.0, 1, 8)


def test_pick_lr_over_schedules_returns_the_pair():
    """Catches a pick that keeps the lr but drops its schedule (the meta-test run would use another baseline than
    the one validated), and candidates run for one schedule only."""
    val = {(0.1, "constant"): 0.5, (1.0, "constant"): 0.6, (0.1, "cosine"): 0.7, (1.0, "cosine"): 0.55}
    calls = []

    def runner(lr, seed, schedule):
        calls.append((lr, schedule, seed))
        return {"val_acc": val[(lr, schedule)], "losses": [1.0], "diverged": False}

    out = pick_lr([0.1, 1.0], runner, seeds=[3], schedules=["constant", "cosine"])
    assert (out["lr"], out["schedule"]) == (0.1, "cosine") and out["at_edge"]
    assert sorted(calls) == sorted((lr, sch, 3) for lr, sch in val)
    assert [(r["lr"], r["schedule"]) for r in out["rows"]] == [(0.1, "constant"), (1.0, "constant"),
                                                              (0.1, "cosine"), (1.0, "cosine")]


def test_a_scheduled_run_is_sgd_with_that_lr_at_each_step(digits_task, one_thread):
    """The registry's SGD with the step schedule over 8 steps equals z −= lr_s·g by hand with lr_s = schedule_lr at
    each 1-based step. Catches the lr set after the step (one step late), a schedule that never reaches the
    optimizer, a schedule over another length than the run's."""
    from raysub.engine.task import loss_and_projected_grad

    cfg, task = digits_task
    seed, lr, steps = 11, 0.5, 8
    stream = metatest.batch_stream(task, cfg, seed)
    z = metatest.start_z(task, seed, cfg.l2o.z0_std)
    for s in range(1, steps + 1):
        _, g = loss_and_projected_grad(task, z, next(stream))
        z = z - metatest.schedule_lr("step", lr, s, steps) * g
    r = metatest.run_optimizee(cfg, task, "sgd", lr, {}, seed, cfg.l2o.z0_std, steps, splits=("val",),
                               schedule="step")
    torch.testing.assert_close(r["z"], z, rtol=1e-4, atol=1e-6)
    flat = metatest.run_optimizee(cfg, task, "sgd", lr, {}, seed, cfg.l2o.z0_std, steps, splits=("val",))
    assert not torch.allclose(flat["z"], z) and r["schedule"] == "step"


def test_the_weights_run_is_the_run_its_manifest_records_even_when_named_l2o(tmp_path, capsys):
    """A meta-training run directory that is itself named ``l2o`` (weights in l2o/l2o/weights.pt): the run is that
    directory, from the directory, the weights file or a generation's file. Catches the old rule (a folder named
    l2o is RUN/l2o, so its parent was taken for the run and N and the seeds fell back to defaults), and a copy no
    manifest records taken for a run."""
    from raysub.l2o.lstm import LearnedOptimizerConfig, adam_like_params
    from raysub.l2o.weights import save_learned_optimizer
    from raysub.runs.manifest import Manifest
    from raysub.storage import RunDir

    config = LearnedOptimizerConfig(hidden_size=4)
    run = tmp_path / "runs" / "l2o"
    sha = save_learned_optimizer(str(run / "l2o" / "weights.pt"), config, adam_like_params(config))
    Manifest(shards={"l2o/weights.pt": sha}).write(RunDir(str(run)))
    cfg = load_config(QUICKSTART, [*TINY, "l2o.steps=37", "l2o.seed=5"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    for given in (run, run / "l2o" / "weights.pt"):
        assert metatest.meta_training_run(str(given)) == str(run)
        trained = metatest.meta_training_config(str(given))
        assert (trained.l2o.steps, trained.l2o.seed) == (37, 5)
    copy = tmp_path / "elsewhere" / "weights.pt"
    copy.parent.mkdir()
    copy.write_bytes((run / "l2o" / "weights.pt").read_bytes())
    assert metatest.meta_training_run(str(copy)) is None and metatest.meta_training_config(str(copy)) is None
    from raysub.bench import l2o_meta_test as bench

    assert bench.main(["--weights", str(copy)]) == 2  # N and the seeds are never guessed
    err = capsys.readouterr().err
    assert "no meta-training run records these weights" in err and "--steps N" in err and "\n" not in err.strip()


@pytest.mark.system  # forks worker processes
def test_runs_in_forked_processes_equal_the_serial_runs(digits_task, one_thread):
    """run_all over 2 forked processes returns, in order, the serial runs' losses and z bit for bit. Catches
    results returned in completion order (a baseline's runs swapped with another's), a forked worker with more
    torch threads (float sums in another order), a run that depends on what ran before it in its process."""
    cfg, task = digits_task
    jobs = [(("sgd", lr, {}, seed, 0.3, 12), {"splits": ("val",), "schedule": sch})
            for lr, seed, sch in ((0.5, 1, "constant"), (0.2, 2, "cosine"), (1.0, 1, "step"))]
    serial = metatest.run_all(cfg, task, jobs, 1)
    forked = metatest.run_all(cfg, task, jobs, 2)
    for a, b in zip(serial, forked):
        assert a["losses"] == b["losses"] and torch.equal(a["z"], b["z"]) and a["schedule"] == b["schedule"]
    assert serial[0]["losses"] != serial[2]["losses"]


def test_a_schedule_that_does_not_exist_is_one_line_before_anything_runs(digits_task):
    """Catches --schedules linear accepted (the pick would fail after its first runs) or reported as a traceback."""
    from raysub.errors import ConfigError

    cfg, _ = digits_task
    with pytest.raises(ConfigError) as e:
        metatest.check_meta_test(cfg, None, 10, [1], 1, 1, {"psgd": [1.0]}, ["cosine", "linear"])
    assert len(e.value.problems) == 1 and "--schedules cosine,linear: choose one or more of constant" in \
        e.value.problems[0]


def _exact_adam_weights(path, adam_lr):
    """adam_schedule φ whose multiplier is e^0 everywhere: exactly Adam at ``adam_lr`` (or at the lr it is given)."""
    from raysub.l2o.lstm import LearnedOptimizerConfig, init_params
    from raysub.l2o.weights import save_learned_optimizer

    config = LearnedOptimizerConfig(hidden_size=2, features=("m", "g"), rule="adam_schedule", adam_lr=adam_lr,
                                    beta1=0.9, beta2=0.999)
    phi = init_params(config)
    phi["out.weight"].zero_()
    phi["sched.weight"].zero_()
    save_learned_optimizer(str(path), config, phi)
    return str(path)


def test_an_adam_schedule_phi_multiplies_its_own_lr_or_adam_s_pick_on_this_task(digits_task, tmp_path, one_thread):
    """φ = exactly Adam (zero multiplier) meta-trained at lr 0.1, meta-tested where Adam† picks 0.01: by default φ
    keeps its own 0.1; ``run`` runs it at Adam†'s 0.01 (its losses are then Adam†'s, step for step); a number sets
    it; other rules have none. Catches the option not passed to φ (transfer to a task whose Adam lr differs then
    starts φ at the wrong lr), the record not saying which lr φ ran."""
    cfg, _ = digits_task
    weights = _exact_adam_weights(tmp_path / "w.pt", 0.1)
    kw = dict(steps=8, horizons=[1], seeds=1, val_seeds=1, grids={"psgd": [0.5], "adam": [0.01]},
              schedules=["constant"], say=lambda s: None)
    run = metatest.meta_test(cfg, weights, phi_adam_lr="run", **kw)
    phi, adam = run["optimizers"]["l2o"]["runs"][0], run["optimizers"]["adam"]["runs"][0]
    assert run["l2o_adam_lr"] == 0.01
    assert phi["losses"] == pytest.approx(adam["losses"], rel=1e-5)
    own = metatest.meta_test(cfg, weights, **kw)
    assert own["l2o_adam_lr"] == 0.1
    assert own["optimizers"]["l2o"]["runs"][0]["losses"][1:] != pytest.approx(adam["losses"][1:], rel=1e-3)
    given = metatest.meta_test(cfg, weights, phi_adam_lr=0.01, **{**kw, "grids": {"psgd": [0.5]}})
    assert given["l2o_adam_lr"] == 0.01 and given["optimizers"]["l2o"]["runs"][0]["losses"] == phi["losses"]
    lstm = metatest.meta_test(cfg, _job_weights_lstm(tmp_path), **kw)  # other rules: no Adam lr to move
    assert lstm["l2o_adam_lr"] is None


def _job_weights_lstm(tmp_path):
    from raysub.l2o.lstm import LearnedOptimizerConfig, adam_like_params
    from raysub.l2o.weights import save_learned_optimizer

    config = LearnedOptimizerConfig(hidden_size=2, step_scale=0.1)
    path = str(tmp_path / "lstm.pt")
    save_learned_optimizer(path, config, adam_like_params(config))
    return path


def test_phi_s_constant_adam_lr_is_adam_s_best_constant_row_not_the_scheduled_pick():
    """Adam†'s pick is 0.3 cosine (90%); its best constant row is 0.03 (88%, over 0.1's 88% by the lower final
    loss): ``constant`` gives 0.03, ``run`` 0.3, ``weights`` φ's own, a number itself. Catches the two swapped, the
    best taken over every row (a scheduled lr under φ's schedule), the tie not broken by the final loss."""
    pick = {"lr": 0.3, "schedule": "cosine", "rows": [
        {"lr": 0.03, "schedule": "constant", "val_acc": 0.88, "final_loss": 0.20},
        {"lr": 0.1, "schedule": "constant", "val_acc": 0.88, "final_loss": 0.25},
        {"lr": 0.3, "schedule": "constant", "val_acc": 0.80, "final_loss": 0.10},
        {"lr": 0.3, "schedule": "cosine", "val_acc": 0.90, "final_loss": 0.15}]}
    assert metatest.phi_adam_base("constant", 0.1, pick)[0] == 0.03
    assert metatest.phi_adam_base("run", 0.1, pick)[0] == 0.3
    assert metatest.phi_adam_base("weights", 0.1, pick)[0] == 0.1
    assert metatest.phi_adam_base(0.007, 0.1, pick)[0] == 0.007


def test_the_meta_test_runs_phi_at_the_constant_row_it_names(digits_task, tmp_path, one_thread):
    """The wiring: the record's l2o_adam_lr is `phi_adam_base` of its own Adam† pick. Catches the choice computed
    from another baseline's rows or ignored."""
    cfg, _ = digits_task
    weights = _exact_adam_weights(tmp_path / "w.pt", 0.1)
    rec = metatest.meta_test(cfg, weights, steps=6, horizons=[1, 2], seeds=1, val_seeds=1,
                             grids={"psgd": [0.5], "adam": [0.001, 0.03, 0.3]}, schedules=["constant", "cosine"],
                             say=lambda s: None, curve_every=0, phi_adam_lr="constant")
    assert rec["l2o_adam_lr"] == metatest.phi_adam_base("constant", 0.1, rec["lr_selection"]["adam"])[0]


def test_adam_lr_choices_that_need_adam_are_checked_only_for_adam_schedule_phi(digits_task, tmp_path):
    """``constant`` needs Adam† and the constant schedule — for an adam_schedule φ; for an lstm φ the option does
    not apply and is not an error. Catches an lstm φ refused over an option it ignores, and an adam_schedule φ
    let through to fail after the picks."""
    from raysub.errors import ConfigError

    cfg, _ = digits_task
    adam_phi = _exact_adam_weights(tmp_path / "w.pt", 0.1)
    with pytest.raises(ConfigError) as e:
        metatest.check_meta_test(cfg, adam_phi, 10, [1], 1, 1, {"psgd": [1.0]}, ["cosine"], "constant")
    assert [p.split(":")[0] for p in e.value.problems] == ["--adam-lr constant", "--adam-lr constant"]
    metatest.check_meta_test(cfg, _job_weights_lstm(tmp_path), 10, [1], 1, 1, {"psgd": [1.0]}, ["cosine"],
                             "constant")


@pytest.mark.parametrize("value", ["fast", "Weights", -0.1, float("nan")])
def test_a_bad_adam_lr_is_one_line_before_anything_runs(digits_task, value):
    """Catches --adam-lr with a typo silently meaning φ's own lr, or a non-positive lr reaching the optimizer."""
    from raysub.errors import ConfigError

    cfg, _ = digits_task
    with pytest.raises(ConfigError) as e:
        metatest.check_meta_test(cfg, None, 10, [1], 1, 1, {"psgd": [1.0]}, ["constant"],
                                 metatest.adam_lr_arg(str(value)))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"--adam-lr {value}")


def test_curve_speedup_hand_computed_interpolates_between_evaluations():
    """φ at 0.35 after 20 steps; the baseline's evaluations 0.4 at 20 and 0.2 at 30 put its crossing at
    20 + (0.4 − 0.35)/(0.4 − 0.2)·10 = 22.5 steps: speedup 1.125. Catches the crossing taken at the evaluation
    after it (1.5) or before it, the interpolation fraction mirrored (27.5 → 1.375), a never-reached baseline
    not flagged as a lower bound, a diverged φ scored above 0."""
    from raysub.metrics import curve_speedup

    phi = [[0, 1.0], [10, 0.5], [20, 0.35], [30, 0.1]]
    base = [[0, 1.0], [10, 0.8], [20, 0.4], [30, 0.2]]
    r = curve_speedup(phi, base, 20)
    assert r["value"] == pytest.approx(1.125) and r["steps"] == pytest.approx(22.5) and not r["lower_bound"]
    assert curve_speedup(phi, base, 10)["value"] == pytest.approx((10 + 0.3 / 0.4 * 10) / 10)  # 0.8 → 0.4 at 0.5
    assert curve_speedup(phi, [[0, 1.0], [10, 0.5]], 10)["value"] == 1.0  # reached exactly at an evaluation
    never = curve_speedup(phi, base, 30)
    assert never["value"] == 1.0 and never["lower_bound"] and never["steps"] is None
    assert curve_speedup([[0, 1.0], [10, 0.5]], base, 20) == {"value": 0.0, "lower_bound": False, "target": None,
                                                              "steps": None}
    assert curve_speedup(phi, [[0, 1.0], [10, float("nan")], [20, 0.3]], 20)["value"] == 1.0  # no NaN crossing
    diverged = curve_speedup(phi, [[0, 1.0]], 20, base_steps=7)  # the baseline diverged at step 7, before 10
    assert diverged["value"] == 7 / 20 and diverged["lower_bound"]


def test_the_evaluated_curve_is_the_loss_of_z_on_fixed_training_samples(digits_task, one_thread):
    """The curve holds step 0, every k-th step and each eval_at step; its values are the eval-mode loss of the
    run's z on the same fixed samples whatever the optimizee's seed. Catches the run's own minibatch used (a noisy
    curve again), a set drawn from the run's seed (optimizers compared on different data), a point off by one
    step (the loss before the step instead of after)."""
    import torch.nn.functional as F

    cfg, task = digits_task
    batch = metatest.curve_set(task, 300)
    assert batch[0].shape[0] == 300 and torch.equal(metatest.curve_set(task, 300)[1], batch[1])
    a = metatest.run_optimizee(cfg, task, "sgd", 0.5, {}, 11, 0.0, 7, eval_at=[5], splits=("val",),
                               curve_every=3, curve_samples=300)
    b = metatest.run_optimizee(cfg, task, "sgd", 0.5, {}, 12, 0.0, 3, splits=("val",), curve_every=3,
                               curve_samples=300)
    assert [s for s, _ in a["curve"]] == [0, 3, 5, 6, 7]
    assert a["curve"][0][1] == b["curve"][0][1]  # z0 = 0 for both: the same set, not the seed's
    task.sub.set_z(a["z"])
    task.model.eval()
    with torch.no_grad():
        by_hand = float(F.cross_entropy(task.sub.forward(batch[0]), batch[1]))
    task.model.train()
    assert a["curve"][-1][1] == pytest.approx(by_hand, rel=1e-6)
    modes, forward = [], task.sub.forward
    task.sub.forward = lambda x: (modes.append(task.model.training), forward(x))[1]
    try:
        task.model.train()
        metatest.curve_loss(task, a["z"], batch)
    finally:
        del task.sub.forward
    assert modes == [False] and task.model.training  # evaluated in eval mode, left in train mode
    assert a["curve"][1][1] != pytest.approx(b["curve"][-1][1], rel=1e-9)  # seeds 11, 12: other batches, other z
    assert "curve" not in metatest.run_optimizee(cfg, task, "sgd", 0.5, {}, 11, 0.0, 2, splits=("val",))


def test_the_record_s_eval_speedups_are_curve_speedups_of_its_own_runs(digits_task, tmp_path, one_thread):
    """The eval speedups over Momentum† and Adam† are `curve_speedup` of φ's and that baseline's curves, per
    optimizee, then the mean. Catches the baselines swapped, one optimizee's curve paired with another's."""
    from raysub.metrics import curve_speedup

    cfg, _ = digits_task
    rec = metatest.meta_test(cfg, _exact_adam_weights(tmp_path / "w.pt", 0.05), steps=6, horizons=[1, 2], seeds=2,
                             val_seeds=1, grids={"psgd": [0.5], "adam": [0.01]}, schedules=["constant"],
                             say=lambda s: None, curve_every=2, phi_adam_lr="weights")  # φ: Adam at 0.05
    opts, m = rec["optimizers"], rec["metrics"]
    assert m["l2o_eval_speedup_over_momentum"] != m["l2o_eval_speedup_over_adam"]
    for name, key in (("psgd", "l2o_eval_speedup_over_momentum"), ("adam", "l2o_eval_speedup_over_adam")):
        for h, suffix in ((1, ""), (2, "_2n")):
            want = [curve_speedup(a["curve"], b["curve"], 6 * h)["value"]
                    for a, b in zip(opts["l2o"]["runs"], opts[name]["runs"])]
            assert m[key + suffix] == pytest.approx(sum(want) / 2)
    assert rec["curve"] == {"samples": metatest.CURVE_SAMPLES, "every": 2, "seed": metatest.CURVE_SEED}


def test_the_bench_refuses_a_transfer_without_its_basis_before_the_main_meta_test(tmp_path, capsys):
    """--transfer mlp with a basis run that does not exist: one line, exit 2, nothing written. Catches the
    transfer task checked only when its turn comes (after the main meta-test's ~15 minutes)."""
    from raysub.bench import l2o_meta_test as bench

    out = tmp_path / "out"
    assert bench.main(["--basis-run", str(tmp_path / "none"), "--steps", "5", "--transfer", "mlp", "--mlp-basis-run",
                       str(tmp_path / "none_mlp"), "--out", str(out), f"data.root={tmp_path}",
                       "data.name=digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "none_mlp has no basis" in err
    assert not out.exists()


def test_transfer_figures_prefix_the_headline_of_each_transfer():
    """The last line's transfer rows: transfer_<task>_<metric> for the Adam† and Momentum† speedups (flags
    included), the step ratios, the best baseline's gap at the transfer's last horizon, the picks. Catches
    another task's key dropped or unprefixed (two transfers then overwrite each other's figures)."""
    from raysub.bench.l2o_meta_test import transfer_figures

    rec = {"horizons": [1, 5], "l2o_adam_lr": 0.003,
           "lr_selection": {"adam": {"lr": 0.003, "schedule": "cosine"}},
           "metrics": {"l2o_speedup_over_adam_5n": 1.1, "l2o_speedup_over_adam_5n_lower_bound": False,
                       "l2o_eval_speedup_over_adam": 2.0, "l2o_over_adam_steps": 0.7, "acc_gap_best_5n_pts": 0.2,
                       "acc_gap_pts": 0.5, "seeds": 3}}
    assert transfer_figures("vit_uv", rec) == {
        "transfer_vit_uv_l2o_speedup_over_adam_5n": 1.1, "transfer_vit_uv_l2o_speedup_over_adam_5n_lower_bound": False,
        "transfer_vit_uv_l2o_eval_speedup_over_adam": 2.0, "transfer_vit_uv_l2o_over_adam_steps": 0.7,
        "transfer_vit_uv_acc_gap_best_pts": 0.2, "transfer_vit_uv_horizons": [1, 5],
        "transfer_vit_uv_lrs": {"adam": [0.003, "cosine"]}, "transfer_vit_uv_l2o_adam_lr": 0.003}
