"""Meta-training of the learned optimizer (raysub.l2o.meta_train, learner, optimizee): the learner's averaging/clipping/NaN guard, the
replacement of finished optimizees, config one-liners, and a tiny end-to-end meta-train on Ray."""
import json
import math
import os

import pytest
import torch

from raysub.cli import QUICKSTART
from raysub.config import load_config
from raysub.errors import ConfigError
from raysub.l2o import load_learned_optimizer
from raysub.l2o.learner import combine, select
from raysub.l2o.meta_train import meta_train
from raysub.l2o.optimizee import OptimizeeWorker
from raysub.l2o.seeds import optimizee_seed
from raysub.l2o.setup import l2o_problems

TINY = ["data.val_fraction=0.2", "train.projection=dense", "train.dim=8", "l2o.hidden_size=4",
        "data.augment=false", "data.batch_size=32"]


def tiny_cfg(tmp_path, *extra):
    return load_config(QUICKSTART, [f"run_dir={tmp_path / 'run'}", *TINY, *extra])


# -- the learner ---------------------------------------------------------------------------------------

def test_combine_averages_exactly():
    """Mutation caught: a sum instead of a mean, or averaging over a different set (e.g. counting dropped ones)."""
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.5])}
    avg, dropped, norm = combine([("a", a, None), ("b", b, None)], clip=100.0, say=lambda *_: None)
    assert dropped == []
    assert torch.equal(avg["w"], torch.tensor([2.0, 1.0])) and torch.equal(avg["b"], torch.tensor([0.25]))
    assert norm == pytest.approx((math.sqrt(5) + math.sqrt(9.25)) / 2)  # mean norm of the contributions


def test_combine_clips_by_global_norm():
    """Mutation caught: per-tensor clipping instead of global, clipping below the limit, or no clipping."""
    g = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # global norm 5
    avg, _, norm = combine([("a", g, None)], clip=1.0, say=lambda *_: None)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(avg["w"], torch.tensor([0.6, 0.0])) and torch.allclose(avg["b"], torch.tensor([0.8]))
    same, _, _ = combine([("a", g, None)], clip=5.5, say=lambda *_: None)
    assert torch.equal(same["w"], g["w"]) and torch.equal(same["b"], g["b"])


def test_combine_clips_each_optimizee_before_averaging():
    """One optimizee 100× the other is clipped to the limit first, so it cannot steer the mean alone. Mutation
    caught: clipping only the average (the result would be (big+small)/2 rescaled: [0.894.., 0.447..]), a
    diverged optimizee (a reason given) kept, or its warning missing its reason."""
    big = {"w": torch.tensor([300.0, 400.0])}  # norm 500 → clipped to [0.6, 0.8]
    small = {"w": torch.tensor([0.2, -0.8])}  # norm 0.82 < 1: kept as is
    said = []
    avg, dropped, norm = combine([("big", big, None), ("small", small, None),
                                  ("gone", {"w": torch.tensor([1e9, 0.0])}, "its loss went from 2.3 to 40")],
                                 clip=1.0, say=said.append)
    assert torch.allclose(avg["w"], torch.tensor([0.4, 0.0]), atol=1e-7)
    assert dropped == ["gone"] and said == ["raysub: warning: dropped the meta-gradient of gone: its loss went "
                                            "from 2.3 to 40"]
    assert norm == pytest.approx((500 + math.sqrt(0.68)) / 2)


def test_combine_drops_nonfinite_and_names_it():
    """Mutation caught: a NaN/inf optimizee kept in the mean (the mean turns NaN), dropped silently, or the
    wrong one dropped; all dropped → no step (None)."""
    good = {"w": torch.tensor([1.0, 1.0])}
    nan = {"w": torch.tensor([float("nan"), 1.0])}
    inf = {"w": torch.tensor([1.0, float("inf")])}
    said = []
    avg, dropped, _ = combine([("opt 1", good, None), ("opt 2", nan, None), ("opt 3", inf, None)], clip=10.0, say=said.append)
    assert dropped == ["opt 2", "opt 3"]
    assert torch.equal(avg["w"], torch.tensor([1.0, 1.0]))
    assert len(said) == 2 and "opt 2" in said[0] and "opt 3" in said[1]
    none, dropped, norm = combine([("opt 2", nan, None)], clip=10.0, say=said.append)
    assert none is None and dropped == ["opt 2"] and math.isnan(norm)


def test_select_fastest_within_accuracy_tolerance():
    """Mutation caught: the tolerance ignored or measured from the wrong row (e.g. the first instead of the most
    accurate), selection by convergence step alone (a fast φ far below in accuracy would win), None treated as
    0, ties going to the later row or to the less accurate one."""
    rows = [{"val_acc": 0.900, "convergence_step": 99}, None, {"val_acc": 0.903, "convergence_step": 80},
            {"val_acc": 0.899, "convergence_step": 50}, {"val_acc": 0.85, "convergence_step": 20},
            {"val_acc": 0.899, "convergence_step": None}]
    assert select(rows, 0.0) == 2  # the most accurate
    assert select(rows, 0.005) == 3  # within 0.903 − 0.005: 99, 80, 50, ∞ → the 50
    assert select(rows, 0.002) == 2  # only 0.903 itself is within 0.002
    assert select(rows, 0.1) == 4
    assert select([{"val_acc": 0.9, "convergence_step": 40}, {"val_acc": 0.91, "convergence_step": 40}], 0.05) == 1
    assert select([{"val_acc": 0.9, "convergence_step": 40}, {"val_acc": 0.9, "convergence_step": 40}], 0.05) == 0
    assert select([None], 0.0) is None and select([], 0.0) is None


# -- optimizees ------------------------------------------------------------------------------------------

def test_diverging_optimizee_is_flagged_and_replaced(tmp_path):
    """A φ taking steps of 1000 per coordinate drives the loss far above 10× its value at z0 in one unroll: the
    result says why (diverged, the two losses) and a fresh optimizee takes the slot; the same worker with a sane
    φ flags nothing. Mutation caught: the factor compared against the wrong loss (the unroll's first instead of
    z0's), divergence never flagged (a runaway optimizee's meta-gradient kept feeding the learner), or a
    flagged optimizee left in place."""
    from raysub.l2o.optimizee import DIVERGED_FACTOR
    from raysub.l2o.setup import initial_phi

    cfg = tiny_cfg(tmp_path, "l2o.steps=20", "l2o.unroll=5", "l2o.optimizees=1", "l2o.actors=1",
                   "l2o.step_scale=1000", "l2o.init_gain=1")
    w = OptimizeeWorker(cfg.to_dict(), [0])
    first = w.live[0]
    r = w.unroll(initial_phi(cfg))[0]
    assert r["diverged"] and r["done"] and "diverged" in r["diverged"] and w.live[0] is not first
    assert max(r["losses"]) > DIVERGED_FACTOR * first.loss_start
    sane = tiny_cfg(tmp_path, "l2o.steps=20", "l2o.unroll=5", "l2o.optimizees=1", "l2o.actors=1",
                    "l2o.step_scale=0.01")
    w = OptimizeeWorker(sane.to_dict(), [0])
    r = w.unroll(initial_phi(sane))[0]
    assert r["diverged"] is None and not r["done"]


def test_finished_optimizee_is_replaced_with_new_seed(tmp_path):
    """N=4, T=2: the optimizee is done after its 2nd unroll and replaced by one with a new seed and z0.
    Mutation caught: replacement after the wrong number of unrolls, reusing the seed/z0, or a done flag never set."""
    from raysub.l2o.setup import initial_phi

    cfg = tiny_cfg(tmp_path, "l2o.steps=4", "l2o.unroll=2", "l2o.optimizees=1", "l2o.actors=1", "l2o.z0_std=0.1")
    w = OptimizeeWorker(cfg.to_dict(), [0])
    phi = initial_phi(cfg)
    first = w.live[0]
    z0 = first.z.clone()
    r1 = w.unroll(phi)[0]
    assert not r1["done"] and w.live[0] is first and first.step == 2 and len(r1["losses"]) == 2
    r2 = w.unroll(phi)[0]
    assert r2["done"] and r2["seed"] == optimizee_seed(cfg, 0)
    fresh = w.live[0]
    assert fresh is not first and fresh.step == 0 and fresh.seed == optimizee_seed(cfg, 1) != first.seed
    assert not torch.equal(fresh.z, z0)
    assert all(torch.isfinite(v).all() for v in r1["grads"].values())


def test_staggered_horizons(tmp_path):
    """Slot s's first optimizee runs N − s·⌊N/n⌋ steps rounded down to whole unrolls, later ones N; serials go
    slot + generation·n. Mutation caught: no stagger (all in sync), a stagger that is not a multiple of T (an
    unroll cut short every lifetime), later generations staggered too, or serials reused across slots."""
    cfg = tiny_cfg(tmp_path, "l2o.steps=10", "l2o.unroll=2", "l2o.optimizees=3", "l2o.actors=1")
    w = OptimizeeWorker.__new__(OptimizeeWorker)
    w.cfg, w.generation = cfg, {0: 0, 1: 0, 2: 0}
    assert [w._next(s) for s in (0, 1, 2)] == [(0, 10), (1, 8), (2, 4)]
    assert [w._next(s) for s in (0, 1, 2)] == [(3, 10), (4, 10), (5, 10)]


# -- config bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("l2o.unroll=20", "l2o.unroll=20 exceeds l2o.steps=10"),
    ("l2o.optimizees=0", "l2o.optimizees=0: must be > 0"),
    ("l2o.actors=0", "l2o.actors=0: must be > 0"),
    ("l2o.actors=3", "l2o.actors=3 exceeds l2o.optimizees=2"),
    ("l2o.meta_lr=-1", "l2o.meta_lr=-1"),
    ("l2o.z0_std=-0.5", "l2o.z0_std=-0.5"),
    ("l2o.features=[x]", "unknown 'x'"),
    ("data.val_fraction=0", "data.val_fraction=0"),
    ("l2o.meta_loss=mean", "l2o.meta_loss='mean': choose sum"),
    ("l2o.select_tolerance=2", "l2o.select_tolerance=2"),
    ("l2o.init_gain=0", "l2o.init_gain=0"),
])
def test_config_bad_input_is_one_line(tmp_path, override, needle):
    """Mutation caught: a missing check (T > N, zero optimizees/actors, no validation split, bad features) or a
    multi-line message."""
    cfg = tiny_cfg(tmp_path, "l2o.steps=10", "l2o.optimizees=2", "l2o.actors=1", override)
    problems = l2o_problems(cfg)
    assert any(needle in p for p in problems), problems
    assert all("\n" not in p for p in problems)
    with pytest.raises(ConfigError):
        meta_train(cfg)
    assert not (tmp_path / "run").exists()  # nothing written before the checks pass


def test_basis_projection_without_basis_run_is_refused(tmp_path):
    """An optimizee task whose projection reads a basis (dldr) with no train.basis_run: one line, before Ray.
    Mutation caught: check_train_projection dropped (the actors would fail later, inside Ray)."""
    cfg = tiny_cfg(tmp_path, "train.projection=dldr")
    with pytest.raises(ConfigError) as info:
        meta_train(cfg)
    assert "basis" in str(info.value) and "\n" not in str(info.value)


def test_default_l2o_section_is_valid(tmp_path):
    """Mutation caught: a check that rejects the defaults."""
    assert l2o_problems(tiny_cfg(tmp_path)) == []


# -- end to end on Ray -----------------------------------------------------------------------------------

def test_meta_train_end_to_end(tmp_path, ray_session):
    """2 actors, 4 meta-steps, validation every 2: weights.pt loads as the learned optimizer, history has two
    validation rows; --resume continues the meta-step count. Mutation caught: weights not written / unloadable,
    validation skipped, resume restarting from 0."""
    cfg = tiny_cfg(tmp_path, "l2o.steps=6", "l2o.unroll=3", "l2o.optimizees=2", "l2o.actors=2",
                   "l2o.meta_steps=4", "l2o.validate_every=2", "l2o.validation_optimizees=2",
                   "l2o.cpus_per_actor=1", "cluster.num_cpus=4")
    lines = []
    hist = meta_train(cfg, say=lines.append)
    config, params = load_learned_optimizer(str(tmp_path / "run" / "l2o" / "weights.pt"), hidden_size=4)
    assert config.hidden_size == 4 and set(params) == {"lstm.weight_ih", "lstm.weight_hh", "lstm.bias",
                                                       "out.weight"}
    assert [r["meta_step"] for r in hist["validation"]] == [0, 2, 4]  # the starting φ is validated too
    # staggered starts: slot 1's first optimizee stops after 3 steps (one unroll), then every one runs N = 6
    assert [[name.split(" (")[0] for name in r["replaced"]] for r in hist["meta"]] == [
        ["optimizee 1"], ["optimizee 0"], ["optimizee 3"], ["optimizee 2"]]
    assert hist["best"] is not None and 0 <= hist["best"]["val_acc"] <= 1
    assert sum(1 for line in lines if line.startswith("l2o: meta-step")) == 3
    import json

    from raysub.checksums import checksum
    assert json.loads((tmp_path / "run" / "l2o" / "history.json").read_text())["validation"][2]["meta_step"] == 4
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    gen = manifest["stages"]["l2o"]["dir"]
    for name in ("weights.pt", "checkpoint.pt", "history.json"):  # committed with their checksums, in GEN
        rel = f"{gen}/{name}"
        assert manifest["shards"][rel] == checksum((tmp_path / "run" / rel).read_bytes())
    for rel in ("l2o/weights.pt", "l2o/history.json"):  # the copies, for people and tools
        assert (tmp_path / "run" / rel).read_bytes() == (tmp_path / "run" / gen / rel.split("/")[-1]).read_bytes()
    assert manifest["stages"]["l2o"] == {"meta_step": 4, "complete": True, "dir": gen}
    assert gen.startswith("l2o/ckpt/") and os.listdir(tmp_path / "run" / "l2o" / "ckpt") == [gen.split("/")[-1]]
    assert (tmp_path / "run" / "l2o" / "curves.png").stat().st_size > 1000
    cfg2 = tiny_cfg(tmp_path, "l2o.steps=6", "l2o.unroll=3", "l2o.optimizees=2", "l2o.actors=2",
                    "l2o.meta_steps=6", "l2o.validate_every=2", "l2o.validation_optimizees=2",
                    "l2o.cpus_per_actor=1", "cluster.num_cpus=4")
    hist2 = meta_train(cfg2, resume=True, say=lines.append)
    assert [r["meta_step"] for r in hist2["validation"]] == [0, 2, 4, 6] and len(hist2["meta"]) == 6


# -- CLI ---------------------------------------------------------------------------------------------------

def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    """Mutation caught: the subcommand not wired, a traceback instead of one line, or a zero exit on bad input."""
    from raysub.cli import main

    rc = main(["l2o", "meta-train", QUICKSTART, f"run_dir={tmp_path / 'run'}", "l2o.unroll=2000"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "l2o.unroll=2000 exceeds l2o.steps=1000" in err
    assert not (tmp_path / "run").exists()


def test_cli_meta_train_runs_and_refuses_existing_run(tmp_path, capsys, ray_session):
    """Mutation caught: the CLI not passing overrides/flags through, or a second run silently overwriting."""
    from raysub.cli import main

    args = ["l2o", "meta-train", QUICKSTART, f"run_dir={tmp_path / 'run'}", *TINY, "l2o.steps=4", "l2o.unroll=2",
            "l2o.optimizees=1", "l2o.actors=1", "l2o.meta_steps=2", "l2o.validate_every=2",
            "l2o.validation_optimizees=1", "cluster.num_cpus=4"]
    assert main(args) == 0
    assert "l2o: meta-step 2/2" in capsys.readouterr().out
    assert (tmp_path / "run" / "l2o" / "weights.pt").exists()
    assert main(args) == 2 and "--resume" in capsys.readouterr().err


def test_resume_reproduces_the_uninterrupted_run(tmp_path, ray_session):
    """4 meta-steps in one go vs 2 then --resume to 4 (validation and checkpoint every 2): φ bit-identical, and
    the optimizees go on mid-run (N=6, T=2: the one in flight at meta-step 2 has done 4 of its 6 steps).
    Mutation caught: optimizee states not checkpointed/restored (fresh seeds after resume), Adam state or the
    meta-step lost, the data cursor restarting at the epoch's start."""
    common = [*TINY, "l2o.steps=6", "l2o.unroll=2", "l2o.optimizees=2", "l2o.actors=2", "l2o.validate_every=2",
              "l2o.validation_optimizees=1", "l2o.z0_std=0.1", "l2o.init=random", "cluster.num_cpus=4"]
    mk = lambda d, n: load_config(QUICKSTART, [f"run_dir={tmp_path / d}", *common, f"l2o.meta_steps={n}"])
    say = lambda *_: None
    meta_train(mk("a", 4), say=say)
    meta_train(mk("b", 2), say=say)
    meta_train(mk("b", 4), resume=True, say=say)
    _, pa = load_learned_optimizer(str(tmp_path / "a"))
    _, pb = load_learned_optimizer(str(tmp_path / "b"))
    ca, cb = (torch.load(tmp_path / d / json.loads((tmp_path / d / "manifest.json").read_text())["stages"]["l2o"]["dir"]
                         / "checkpoint.pt", weights_only=False) for d in "ab")
    for k in pa:
        assert torch.equal(pa[k], pb[k]) and torch.equal(ca["phi"][k], cb["phi"][k]), k
    nowall = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert nowall(ca["history"]["meta"]) == nowall(cb["history"]["meta"])
    assert cb["optimizees"][0]["step"] == ca["optimizees"][0]["step"] == 2  # 4 unrolls of 2 = 6 + 2


def test_adam_like_start_has_live_hidden_units(tmp_path):
    """adam_like: unit 0 is the hand-built tanh-clipped Adam (gain l2o.init_gain), biases and recurrent weights
    are exactly those of `adam_like_params`, and units 1.. have small random input and output weights — so
    they get meta-gradient and the first steps are within 1% of the hand-built ones. Mutation caught: noise on
    the biases (a constant drift: every coordinate pushed the same way), no noise (units 1.. dead for good:
    their output weights' gradient is 0), init_gain not passed on."""
    from raysub.l2o.lstm import adam_like_params, init_state, update
    from raysub.l2o.meta import unroll_meta_grad
    from raysub.l2o.setup import initial_phi, opt_config

    cfg = tiny_cfg(tmp_path, "l2o.init_gain=0.3", "l2o.step_scale=0.5")
    config = opt_config(cfg)
    phi, hand = initial_phi(cfg), adam_like_params(config, gain=0.3)
    h = config.hidden_size
    assert torch.equal(phi["lstm.bias"], hand["lstm.bias"]) and torch.equal(phi["lstm.weight_hh"], hand["lstm.weight_hh"])
    unit0 = [0, h, 2 * h, 3 * h]
    assert torch.equal(phi["lstm.weight_ih"][unit0], hand["lstm.weight_ih"][unit0])
    assert phi["out.weight"][0] == hand["out.weight"][0] == -0.3 / 0.05
    assert (phi["out.weight"][1:] != 0).all() and (phi["lstm.weight_ih"][h + 1 : 2 * h] != 0).all()
    g = torch.tensor([0.3, -1.0, 2.0, 0.01])
    s1, s2 = init_state(config, 4), init_state(config, 4)
    for _ in range(3):
        d1, s1 = update(phi, config, g, s1)
        d2, s2 = update(hand, config, g, s2)
        assert torch.allclose(d1, d2, rtol=0.01, atol=1e-4)

    def quad(z, batch):  # L = ½‖z − 1‖², its gradient z − 1
        return 0.5 * ((z - 1) ** 2).sum(), z - 1

    u = unroll_meta_grad(phi, config, quad, torch.zeros(4), init_state(config, 4), [None] * 3)
    assert (u.grads["out.weight"][1:].abs() > 0).all()  # units 1.. learn


def test_meta_validation_reads_train_and_val_never_test(tmp_path, monkeypatch):
    """A validation runs N steps on training batches, then evaluates on the held-out ``val`` split; the test
    split is never touched (the reference code selects φ on test). Mutation caught: evaluating on "test", or
    training the validation optimizee on val batches."""
    import raysub.engine.task as task_mod
    from raysub.l2o.setup import initial_phi

    cfg = tiny_cfg(tmp_path, "l2o.steps=6", "l2o.unroll=3", "l2o.optimizees=1", "l2o.actors=1")
    w = OptimizeeWorker(cfg.to_dict(), [0])
    evaluated, batched = [], []
    real_eval = task_mod.evaluate_task
    monkeypatch.setattr(task_mod, "evaluate_task", lambda task, z, split, *a, **k: (
        evaluated.append(split), real_eval(task, z, split, *a, **k))[1])
    data = w.tasks[0].data
    real_batches = data.batches
    monkeypatch.setattr(data, "batches", lambda split, *a, **k: (batched.append(split), real_batches(split, *a, **k))[1])
    row = w.validate(initial_phi(cfg), 500_000)
    assert evaluated == ["val"] and set(batched) == {"train", "val"} and len(row["losses"]) == 6
    assert batched.index("val") == len(batched) - batched[::-1].count("val")  # val read only after training


def test_select_by_final_loss_ranks_by_the_end_of_the_runs():
    """l2o.select_by=final_loss: within the accuracy tolerance the lowest smoothed final loss wins, not the fastest
    convergence. Catches the option ignored (the early-converging φ that then levels off would be kept), a
    missing or non-finite final loss ranked first, the tolerance dropped."""
    rows = [{"val_acc": 0.906, "convergence_step": 48, "final_loss": 0.123},
            {"val_acc": 0.908, "convergence_step": 99, "final_loss": 0.118},
            {"val_acc": 0.905, "convergence_step": 60, "final_loss": float("nan")},
            {"val_acc": 0.880, "convergence_step": 70, "final_loss": 0.100}]
    assert select(rows, 0.005) == 0
    assert select(rows, 0.005, by="final_loss") == 1
    assert select(rows, 0.05, by="final_loss") == 3
