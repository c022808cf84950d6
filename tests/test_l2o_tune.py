"""``raysub l2o tune`` (raysub.l2o.tune): the space checks (one line, nothing started or written), the random draw,
a trial's config and resources, the ASHA metric, the best-trial rule, and one tiny real Tune experiment on the
session's Ray (2 trials, then --resume of the finished experiment)."""
import json
import os

import pytest

from raysub.cli import CONFIG_DIR, QUICKSTART, main
from raysub.config import load_config
from raysub.errors import ConfigError
from raysub.l2o import tune as lt

TINY = ["data.val_fraction=0.2", "train.projection=dense", "train.dim=8", "l2o.hidden_size=4", "data.augment=false",
        "data.batch_size=32", "l2o.steps=20", "l2o.unroll=5", "l2o.optimizees=1", "l2o.actors=1"]


def tiny_cfg(tmp_path, *extra):
    return load_config(QUICKSTART, [f"run_dir={tmp_path / 'run'}", *TINY, *extra])


# -- bad input: one line, exit 2, before Ray or any file ------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("l2o_tune.space={hidden_size: []}", "l2o_tune.space.hidden_size is an empty choice"),
    ("l2o_tune.space={hidden: [4, 8]}", "unknown key 'hidden': the space may set hidden_size, meta_lr"),
    ("l2o_tune.space={hidden_size: [0, 8]}", "l2o_tune.space.hidden_size: choice 0: l2o.hidden_size=0: must be > 0"),
    ("l2o_tune.space={unroll: [5, 40]}", "choice 40: l2o.unroll=40 exceeds l2o.steps=20"),
    ("l2o_tune.space={optimizees: [2, 0]}", "l2o_tune.space.optimizees: choice 0: l2o.optimizees=0: must be > 0"),
    ("l2o_tune.space={features: [[m], [g]]}", "choice ['g']: l2o.init=adam_like needs the 'm' feature"),
    ("l2o_tune.space={hidden_size: [8.5]}", "choice 8.5: l2o.hidden_size: expected an integer"),
    ("l2o_tune.space={hidden_size: 8}", "l2o_tune.space.hidden_size=8: give a list of choices"),
    ("l2o_tune.space={}", "l2o_tune.space is empty"),
    ("l2o_tune.space={meta_lr: [0.01, 0.01]}", "repeats a value"),
    ("l2o_tune.samples=0", "l2o_tune.samples=0: must be ≥ 1"),
    ("l2o_tune.reduction_factor=1", "l2o_tune.reduction_factor=1: must be ≥ 2"),
    ("l2o.validate_every=0", "l2o.validate_every=0: must be > 0"),  # the l2o section itself is checked too
])
def test_bad_input_is_one_line_and_starts_nothing(tmp_path, capsys, override, needle):
    """Mutation caught: a missing check (empty choice, unknown key, a bad value inside the space, a bad
    l2o_tune/l2o number), a traceback or several lines instead of one, or the run directory (lock, config.yaml)
    or Ray started before the checks pass."""
    import ray

    ray_was_up = ray.is_initialized()
    rc = main(["l2o", "tune", QUICKSTART, f"run_dir={tmp_path / 'run'}", *TINY, override])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()
    assert ray.is_initialized() == ray_was_up


def test_every_problem_is_reported_at_once(tmp_path):
    """Mutation caught: stopping at the first problem."""
    cfg = tiny_cfg(tmp_path, "l2o_tune.space={hidden_size: [], bogus: [1], unroll: [50]}", "l2o_tune.samples=0")
    with pytest.raises(ConfigError) as info:
        lt.plan_tune(cfg)
    text = str(info.value)
    assert all(n in text for n in ("hidden_size is an empty choice", "unknown key 'bogus'", "choice 50",
                                   "samples=0"))


def test_a_swept_key_is_checked_per_choice_not_in_the_section(tmp_path):
    """The space replaces l2o.unroll in every trial, so a bad l2o.unroll is no problem while unroll is swept — and
    is one when it is not. Mutation caught: the section's value of a swept key refused (a valid space rejected), or
    the section's other keys left unchecked."""
    assert lt.tune_problems(tiny_cfg(tmp_path, "l2o.unroll=50", "l2o_tune.space={unroll: [5, 10]}")) == []
    problems = lt.tune_problems(tiny_cfg(tmp_path, "l2o.unroll=50", "l2o_tune.space={hidden_size: [4, 8]}"))
    assert problems == ["l2o.unroll=50 exceeds l2o.steps=20: an unroll (T) is part of one optimizee's N steps; "
                        "lower l2o.unroll or raise l2o.steps"]


def test_l2o_tune_needs_a_config(capsys):
    """Mutation caught: the subcommand not wired into the CLI, or its message naming meta-train."""
    assert main(["l2o", "tune", "l2o_tune.samples=2"]) == 2
    assert "raysub l2o tune needs a CONFIG" in capsys.readouterr().err


def test_shipped_example_is_valid():
    """Mutation caught: the shipped example's space or l2o section broken (it would fail only when run)."""
    cfg = load_config(os.path.join(CONFIG_DIR, "l2o_tune_digits.yaml"))
    assert lt.tune_problems(cfg) == []
    assert len(lt.sample_points(cfg.l2o_tune.space, cfg.l2o_tune.samples, cfg.l2o_tune.seed)) == cfg.l2o_tune.samples


# -- the search space and a trial ----------------------------------------------------------------------------

SPACE = {"hidden_size": [8, 20], "meta_lr": [0.003, 0.01, 0.03], "unroll": [5, 10]}


def test_sample_points_are_distinct_seeded_and_in_the_space():
    """Mutation caught: sampling with replacement (the same meta-training twice), an unseeded draw (another
    experiment on rerun), more points than the space holds, or a point outside the space."""
    a = lt.sample_points(SPACE, 5, seed=0)
    assert a == lt.sample_points(SPACE, 5, seed=0) != lt.sample_points(SPACE, 5, seed=1)
    assert len(a) == 5 and len({json.dumps(p) for p in a}) == 5
    assert all(list(p) == ["hidden_size", "meta_lr", "unroll"] and all(p[k] in SPACE[k] for k in p) for p in a)
    every = lt.sample_points(SPACE, 100, seed=3)  # 12 points: all of them, once each
    assert len(every) == 12 and len({json.dumps(p) for p in every}) == 12


def test_trial_config_sets_the_point_and_run_dir_only(tmp_path):
    """Mutation caught: the point written into the wrong section, the run_dir not the trial's own (trials would
    overwrite each other's weights), or the base config mutated (a later trial inheriting an earlier point)."""
    base = tiny_cfg(tmp_path).to_dict()
    before = json.dumps(base)
    point = {"hidden_size": 8, "meta_lr": 0.03, "features": ["m"]}
    cfg = lt.trial_config(base, point, "/r/trials/t1")
    cfg["l2o"]["features"].append("g")  # a trial's config shares nothing with the base or the point
    assert json.dumps(base) == before and point["features"] == ["m"]
    assert cfg["run_dir"] == "/r/trials/t1"
    assert (cfg["l2o"]["hidden_size"], cfg["l2o"]["meta_lr"], cfg["l2o"]["unroll"], cfg["l2o"]["steps"]) == \
        (8, 0.03, 5, 20)
    assert {k: v for k, v in cfg.items() if k not in ("l2o", "run_dir")} == \
        {k: v for k, v in base.items() if k not in ("l2o", "run_dir")}


def test_trial_name():
    """Mutation caught: a name without the trial id (two equal points would share a run directory)."""
    assert lt.trial_name({"hidden_size": 8, "meta_lr": 0.01, "unroll": 5, "features": ["m", "g"]},
                         "abc12_00003") == "h8-lr0.01-T5-fmg-abc12_00003"
    # issue 27's keys: a horizon range of ints, a rule name (an int list once broke the name: join of non-strings)
    assert lt.trial_name({"rule": "adam_schedule", "horizons": [50, 1000], "late_weight": 1.0}, "x_1") == \
        "radam_schedule-H50+1000-w1-x_1"


def test_trial_reserves_no_cpu_its_actors_do(tmp_path):
    """The trial's own bundle holds no CPU; each optimizee actor has a bundle of l2o.cpus_per_actor in the
    trial's placement group (Tune schedules a trial's child actors there). Mutation caught: a trial reserving a
    CPU its actors then lack, or bundles that do not fit the actors (they could not be created inside the trial)."""
    pgf = lt.trial_resources(tiny_cfg(tmp_path, "l2o.optimizees=3", "l2o.actors=3", "l2o.cpus_per_actor=0.5"))
    assert pgf.bundles == [{"memory": 1}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}]


def test_concurrency_fits_the_actors(tmp_path, monkeypatch):
    """Mutation caught: concurrency counting trials instead of their actors' CPUs, a max_concurrent_trials above
    what fits taken silently, or a trial bigger than the cluster accepted (it would wait forever)."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    said = []
    cfg = tiny_cfg(tmp_path, "l2o.optimizees=2", "l2o.actors=2", "l2o.cpus_per_actor=1")
    assert lt.concurrency(cfg, 10, said.append) == 2 and said == []
    assert lt.concurrency(cfg, 1, said.append) == 1
    cfg.l2o_tune.max_concurrent_trials = 1
    assert lt.concurrency(cfg, 10, said.append) == 1
    cfg.l2o_tune.max_concurrent_trials = 3
    assert lt.concurrency(cfg, 10, said.append) == 2 and "max_concurrent_trials=3 ignored" in said[0]
    cfg.l2o.cpus_per_actor = 3
    with pytest.raises(ConfigError, match="needs l2o.actors=2 × l2o.cpus_per_actor=3 = 6 CPUs"):
        lt.concurrency(cfg, 10, said.append)


# -- the metric and the best trial ----------------------------------------------------------------------------

def test_asha_metric_counts_never_converged_as_worse_than_any():
    """Mutation caught: None mapped to 0 (a φ that never converges would look fastest to ASHA) or to a number
    within the run (as good as a converged one)."""
    assert lt.asha_metric(None, 20) == 21.0
    assert lt.asha_metric(20, 20) == 20.0 < lt.asha_metric(None, 20)
    assert lt.asha_metric(3.5, 20) == 3.5


def _row(name, acc, conv, **extra):
    return {"trial": name, "best": {"val_acc": acc, "convergence_step": conv}, **extra}


def test_best_trial_fastest_within_accuracy_tolerance():
    """Mutation caught: the tolerance ignored (accuracy only) or applied the wrong way, selection by convergence
    step alone, None treated as fast, a failed trial selected, or a full tie going to the later trial (the best
    would change with the order Tune lists them)."""
    assert lt.best_trial([_row("a", 0.80, 10), _row("b", 0.90, 300), _row("c", 0.85, 5)], 0.0)["trial"] == "b"
    assert lt.best_trial([_row("a", 0.80, 10), _row("b", 0.90, 300), _row("c", 0.85, 5)], 0.05)["trial"] == "c"
    assert lt.best_trial([_row("a", 0.90, 300), _row("b", 0.896, 40), _row("c", 0.90, None)], 0.005)["trial"] == "b"
    assert lt.best_trial([_row("a", 0.90, None), _row("b", 0.90, 200)], 0.0)["trial"] == "b"
    assert lt.best_trial([_row("a", 0.90, 50), _row("b", 0.90, 50)], 0.0)["trial"] == "a"
    assert lt.best_trial([_row("a", 0.99, 1, error="boom"), _row("b", 0.5, 9)], 0.0)["trial"] == "b"
    assert lt.best_trial([{"trial": "a", "error": "never started"}], 0.0) is None


def test_meta_train_seconds_adds_resumed_segments():
    """wall_s counts from each process's start. Mutation caught: a resumed trial's time taken as its last
    segment only, or the segments' every row summed."""
    history = {"validation": [{"wall_s": 2.0}, {"wall_s": 5.0}, {"wall_s": 1.0}, {"wall_s": 4.0}]}
    assert lt.meta_train_seconds(history) == 9.0
    assert lt.meta_train_seconds({"validation": [{"wall_s": 3.0}]}) == 3.0


# -- end to end on Ray ---------------------------------------------------------------------------------------

def test_tune_end_to_end_then_resume_runs_no_new_trial(tmp_path, capsys, ray_session):
    """2 trials (1 actor of 0.5 CPU each) of 2 meta-steps: results.json, best_config.yaml (a config meta-train
    loads, with the best point), RUN/l2o/weights.pt (the best trial's φ, found from RUN); then --resume of the
    finished experiment restores it and starts nothing. Mutation caught: outputs missing or not the best trial's,
    weights not where `train.optimizer_options.weights=RUN` looks, trial run dirs shared, resume re-running or
    adding trials, the CLI not passing --resume through."""
    from raysub.l2o import load_learned_optimizer

    run = tmp_path / "run"
    args = ["l2o", "tune", QUICKSTART, f"run_dir={run}", *TINY, "l2o.meta_steps=2", "l2o.validate_every=2",
            "l2o.validation_optimizees=1", "l2o.cpus_per_actor=0.5", "l2o_tune.samples=2",
            "l2o_tune.space={hidden_size: [2, 4], meta_lr: [0.01, 0.1]}"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    summary = json.loads((run / "l2o_tune" / "results.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 2 and len({t["trial"] for t in trials}) == 2
    assert sorted(os.listdir(run / "trials")) == sorted(t["trial"] for t in trials)
    for t in trials:
        assert t["meta_steps"] == 2 and t["validations"] == 2 and not t["stopped_early"]
        assert 0 <= t["best"]["val_acc"] <= 1 and t["point"]["hidden_size"] in (2, 4)
    best = lt.best_trial(trials, 0.005)
    assert summary["best"]["trial"] == best["trial"] and f"{best['trial']} *" in out and "wall time" in out
    cfg = load_config(str(run / "l2o_tune" / "best_config.yaml"))
    assert (cfg.l2o.hidden_size, cfg.l2o.meta_lr) == (best["point"]["hidden_size"], best["point"]["meta_lr"])
    assert cfg.run_dir == best["run_dir"]
    config, params = load_learned_optimizer(str(run), hidden_size=best["point"]["hidden_size"])
    _, trial_params = load_learned_optimizer(best["run_dir"])
    assert all((params[k] == trial_params[k]).all() for k in params)

    histories = {t["trial"]: (run / "trials" / t["trial"] / "l2o" / "history.json").read_bytes() for t in trials}
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "restoring" in out
    assert sorted(os.listdir(run / "trials")) == sorted(histories)
    for name, text in histories.items():  # no trial ran again
        assert (run / "trials" / name / "l2o" / "history.json").read_bytes() == text
    again = json.loads((run / "l2o_tune" / "results.json").read_text())
    assert [t["trial"] for t in again["trials"]] == [t["trial"] for t in trials]
    assert again["best"]["trial"] == summary["best"]["trial"]


def test_tune_table_shows_named_and_list_choices_and_the_final_loss():
    """A space over issue 27's keys: a rule name, an estimator, a horizon range of ints, a number. Catches the table
    formatting every choice as a number (it crashed with "Unknown format code 'g' for str" after an hour of
    trials), the final loss missing when trials are selected by it."""
    from raysub.report.tables import tune_table

    trial = {"trial": "t0", "point": {"meta_lr": 0.003, "rule": "adam_schedule", "estimator": "pes",
                                      "horizons": [100, 1000]},
             "best": {"val_acc": 0.9045, "convergence_step": 118.5, "final_loss": 0.12723}, "meta_steps": 200,
             "stopped_early": False, "meta_train_s": 650.4}
    summary = {"space_keys": ["meta_lr", "rule", "estimator", "horizons"], "best": {"trial": "t0"},
               "trials": [trial, {"trial": "t1", "point": None}], "meta_steps": 200, "validation_optimizees": 2,
               "steps": 1000, "selection": "lowest final loss within 0.005 val acc of the best"}
    table = tune_table(summary)
    row = next(line for line in table.splitlines() if line.startswith("t0 *"))
    for cell in ("0.003", "adam_schedule", "pes", "100-1000", "90.45%", "118.5", "0.1272", "200/200"):
        assert cell in row, (cell, row)
    assert "error" in table and "of 1000 steps" in table and "lowest final loss" in table
