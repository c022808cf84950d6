"""Issue 27's φ: the fraction of the run done as an input, a rule that starts exactly at Adam (adam_schedule),
optimizee horizons drawn log-uniformly, and a meta-loss that weights late training — pinned on hand-computed
cases."""
import math
import statistics

import pytest
import torch

from raysub.cli import QUICKSTART
from raysub.config import load_config
from raysub.errors import ConfigError
from raysub.l2o import lstm
from raysub.l2o.lstm import LearnedOptimizerConfig, init_params, init_state, update


def test_progress_is_the_fraction_done_before_the_step_and_capped():
    """features() at t = 3 of a 10-step run reads 0.2 (two steps done before the third), 0 without a horizon, 1
    past the horizon. Catches t/T instead of (t−1)/T (φ would never see 0), no cap (inputs beyond what φ saw)."""
    config = LearnedOptimizerConfig(hidden_size=2, features=("m", "progress"))
    g = torch.tensor([1.0, -2.0])
    m, v = torch.tensor([0.1, 0.2]), torch.tensor([0.01, 0.04])
    assert lstm.features(config, g, m, v, 3, 10)[:, 1].tolist() == pytest.approx([0.2, 0.2])
    assert lstm.features(config, g, m, v, 1, 10)[:, 1].tolist() == [0.0, 0.0]
    assert lstm.features(config, g, m, v, 3, None)[:, 1].tolist() == [0.0, 0.0]
    assert lstm.features(config, g, m, v, 50, 10)[:, 1].tolist() == [1.0, 1.0]
    state = init_state(config, 2, horizon=10)
    for _ in range(3):
        _, state = update(init_params(config), config, g, state)
    assert state["t"] == 3 and state["horizon"] == 10  # the horizon travels with the state


def test_adam_schedule_starts_exactly_at_adam():
    """With a zero output row the rule is torch's Adam at adam_lr (β 0.9/0.999, ε outside the root) step for step,
    whatever the LSTM's weights. Catches ε inside the root (the lstm rule's features), a missing bias
    correction, a sign flip, a multiplier that is not 1 at the start."""
    config = LearnedOptimizerConfig(hidden_size=3, features=("m", "g", "progress"), rule="adam_schedule",
                                    adam_lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8)
    phi = init_params(config, seed=1, dtype=torch.float64)
    phi["out.weight"].zero_()
    phi["sched.weight"].zero_()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, generator=gen, dtype=torch.float64) * 10 ** k for k in (-3, 0, 2, -1, 0)]
    z_ref = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([z_ref], lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    z, state = torch.zeros(4, dtype=torch.float64), init_state(config, 4, torch.float64, horizon=5)
    for g in grads:
        z_ref.grad = g.clone()
        adam.step()
        delta, state = update(phi, config, g, state)
        z = z + delta
        torch.testing.assert_close(z, z_ref.detach(), rtol=1e-12, atol=1e-15)


def test_adam_schedule_multiplier_per_coordinate_or_per_step():
    """out = w_outᵀh scales Adam's step by e^out per coordinate, capped at e^±5; per_coordinate=false uses e^mean.
    Catches the multiplier applied outside exp, no cap (a φ that learns e^50), the mean taken over steps."""
    base = dict(hidden_size=2, features=("m",), rule="adam_schedule", adam_lr=1.0, beta1=0.0, beta2=0.0, eps=1e-30)
    g = torch.tensor([1.0, -4.0], dtype=torch.float64)  # β 0: Adam's step is g/|g| = ±1
    phi = {k: torch.zeros(s, dtype=torch.float64) for k, s in lstm.param_shapes(LearnedOptimizerConfig(**base)).items()}
    phi["lstm.bias"][0], phi["lstm.bias"][2 * 2], phi["lstm.bias"][3 * 2] = 30.0, 30.0, 30.0  # unit 0: h = tanh(tanh(m))
    phi["lstm.weight_ih"][2 * 2, 0] = 100.0  # cell candidate of unit 0 = tanh(30 + 100·m) = ±1
    phi["out.weight"][0] = 10.0
    h0 = math.tanh(1.0)
    cap = lstm.MAX_LOG_SCALE
    for per, want in ((True, [-math.exp(cap), math.exp(-cap)]),  # out = ±10·tanh(1) = ±7.6 → capped at ±cap
                      (False, [-1.0, 1.0])):  # mean of +7.6 and −7.6 = 0 → e^0
        config = LearnedOptimizerConfig(**base, per_coordinate=per)
        delta, _ = update(phi, config, g, init_state(config, 2, torch.float64))
        assert delta.tolist() == pytest.approx(want), (per, 10 * h0)


def test_weights_without_the_new_fields_load_as_the_sl2o_rule():
    """A weights.pt written before issue 27 (its config has no rule, adam_lr, per_coordinate) keeps working as the
    lstm rule. Catches a from_dict that refuses the old keys' absence or defaults to another rule."""
    old = {"hidden_size": 4, "features": ["m", "g"], "step_scale": 1.0, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    config = LearnedOptimizerConfig.from_dict(old)
    assert config.rule == "lstm" and not config.needs_horizon


def test_a_progress_phi_refuses_a_run_without_a_length():
    """Catches φ silently reading progress 0 all run long when nobody gave it the run's length."""
    from raysub.l2o.optimizer import LearnedOptimizer

    config = LearnedOptimizerConfig(hidden_size=2, features=("m", "progress"))
    z = torch.zeros(3)
    opt = LearnedOptimizer(z, config, init_params(config))
    with pytest.raises(ConfigError, match="fraction of the run"):
        opt.step(z, torch.ones(3), 1.0)
    opt.set_horizon(10)
    opt.step(z, torch.ones(3), 1.0)
    assert opt.state_dict()["horizon"] == 10


def _cfg(*overrides):
    return load_config(QUICKSTART, ["data.val_fraction=0.2", "train.projection=dense", "train.dim=10",
                                    "l2o.unroll=10", *overrides])


def test_sampled_horizons_are_log_uniform_whole_unrolls_from_the_seed():
    """2,000 optimizees over [50, 1000]: each a multiple of the unroll in range, the same on every call, median
    near √(50·1000) ≈ 224 (uniform would put it near 525). Catches a uniform draw, a draw from a global RNG (a
    resumed meta-training would change its optimizees), a horizon not in whole unrolls."""
    from raysub.l2o.optimizee import sampled_horizon

    cfg = _cfg("l2o.horizons=[50, 1000]")
    hs = [sampled_horizon(cfg, s) for s in range(2000)]
    assert hs == [sampled_horizon(cfg, s) for s in range(2000)]
    assert all(50 <= h <= 1000 and h % 10 == 0 for h in hs)
    assert 190 <= statistics.median(hs) <= 260
    assert sum(h < 100 for h in hs) / len(hs) == pytest.approx(math.log(2) / math.log(20), abs=0.04)
    bad = _cfg("l2o.horizons=[5, 1000]")  # below one unroll
    from raysub.l2o.setup import l2o_problems

    assert any("l2o.horizons" in p for p in l2o_problems(bad))


def test_late_weights_hand_computed_and_applied_per_term():
    """ω = (1 + a·p)/(1 + a/2) with p the fraction done after each step: a = 2, steps 1–2 of 4 → [0.75, 1.0].
    And unroll_meta_grad's meta-gradient is linear in the weights: ω = (2, 3) gives 2·(term 1's) + 3·(term 2's).
    Catches weights that are ignored, applied to the wrong term, or computed before the step instead of after."""
    from raysub.l2o.meta import unroll_meta_grad
    from raysub.l2o.optimizee import late_weights

    assert late_weights(2.0, 0, 2, 4) == pytest.approx([0.75, 1.0])
    assert late_weights(2.0, 2, 2, 4) == pytest.approx([1.25, 1.5])
    assert late_weights(0.0, 0, 2, 4) is None
    config = LearnedOptimizerConfig(hidden_size=3, features=("m", "g"))
    phi = init_params(config, seed=3, dtype=torch.float64)
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def f(z, batch):  # a quadratic per batch: L = ½ b ‖z − target‖², g = b (z − target)
        return 0.5 * batch * ((z - target) ** 2).sum(), batch * (z - target)

    z0, s0 = torch.zeros(3, dtype=torch.float64), init_state(config, 3, torch.float64)
    runs = {w: unroll_meta_grad(phi, config, f, z0, s0, [1.0, 2.0], term_weights=w) for w in ((1, 0), (0, 1), (2, 3))}
    for k in phi:
        torch.testing.assert_close(runs[(2, 3)].grads[k], 2 * runs[(1, 0)].grads[k] + 3 * runs[(0, 1)].grads[k])
    assert runs[(1, 0)].grads["out.weight"].abs().sum() > 0 and runs[(0, 1)].grads["out.weight"].abs().sum() > 0


def test_a_worker_runs_adam_schedule_optimizees_of_drawn_horizons(tmp_path):
    """The optimizee actor's side with the issue's options: each optimizee's state carries its drawn horizon (the
    progress input's T), the first unroll's meta-gradient reaches the output row (the only way off the exact-Adam
    start) and not yet the LSTM behind it, validation runs l2o.validation_steps. Catches a horizon drawn but not
    given to φ, a start whose multiplier cannot move, validation still at l2o.steps."""
    from test_l2o_meta import tiny_cfg

    from raysub.l2o.optimizee import OptimizeeWorker, sampled_horizon
    from raysub.l2o.setup import initial_phi

    cfg = tiny_cfg(tmp_path, "l2o.rule=adam_schedule", "l2o.adam_lr=0.05", "l2o.features=[m, g, progress]",
                   "l2o.horizons=[4, 12]", "l2o.unroll=2", "l2o.late_weight=1", "l2o.optimizees=2", "l2o.actors=1",
                   "l2o.validation_steps=6")
    w = OptimizeeWorker(cfg.to_dict(), [0, 1])
    assert [w.live[s].horizon for s in (0, 1)] == [sampled_horizon(cfg, 0), sampled_horizon(cfg, 1)]
    assert [w.live[s].state["horizon"] for s in (0, 1)] == [w.live[s].horizon for s in (0, 1)]
    phi = initial_phi(cfg)
    assert phi["out.weight"].abs().sum() == 0 and phi["sched.weight"].abs().sum() == 0
    r = w.unroll(phi)[0]
    assert r["grads"]["out.weight"].abs().sum() > 0 and r["grads"]["lstm.weight_ih"].abs().sum() == 0
    assert r["grads"]["sched.weight"][0] != 0  # the schedule's first knot is trained from the first unroll
    row = w.validate(phi, 500_000)
    assert len(row["losses"]) == 6 and 0 < row["val_acc"] <= 1


def test_pes_estimate_hand_computed_and_unbiased_on_a_quadratic():
    """L(φ) = ‖φ‖² at φ = (1, 2), ε = (σ, 0): (L(φ+ε) − L(φ−ε))·ξ/(2σ²) = (4σ/(2σ²))·(σ, 0) = (2, 0), the gradient's
    first coordinate. Averaged over 4,000 antithetic draws it is ∇L = (2, 4). Catches σ for σ² in the
    denominator, a missing 2 (an estimate twice the gradient), the − particle's ξ used with the + sign."""
    from raysub.l2o.learner import pes_contributions, pes_estimate

    sigma = 0.1
    phi = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def loss(p):
        return float((p * p).sum())

    eps = torch.tensor([sigma, 0.0], dtype=torch.float64)
    est = pes_estimate(loss(phi + eps), loss(phi - eps), {"w": eps}, sigma)["w"]
    assert est.tolist() == pytest.approx([2.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(2, dtype=torch.float64)
    for _ in range(4000):
        e = torch.randn(2, generator=gen, dtype=torch.float64) * sigma
        total += pes_estimate(loss(phi + e), loss(phi - e), {"w": e}, sigma)["w"]
    assert (total / 4000).tolist() == pytest.approx([2.0, 4.0], rel=0.06)
    # the learner pairs particles by sign, in any order, and drops a pair with a non-finite meta-loss
    xi = {"w": eps}

    def particle(pair, sign, value):
        return {"name": f"p{pair}{sign}", "pes": {"pair": pair, "sign": sign, "value": value,
                                                  "xi": {"w": sign * eps}}}

    out = pes_contributions([particle(1, -1, loss(phi - eps)), particle(0, 1, float("nan")), particle(0, -1, 1.0),
                             particle(1, 1, loss(phi + eps))], sigma)
    assert [why is None for _, _, why in out] == [False, True]
    assert out[1][1]["w"].tolist() == pytest.approx(pes_estimate(loss(phi + eps), loss(phi - eps), xi, sigma)
                                                    ["w"].tolist())


def test_pes_pairs_run_one_optimizee_at_phi_plus_and_minus_epsilon(tmp_path):
    """Slots 0 and 1 are one optimizee (seed, z0, horizon) at φ ± ε with the same ε; ξ is the sum of the pair's ε's
    over the unrolls (+ for slot 0, − for slot 1) and starts again at the replacement. Catches halves with
    different data (the difference would measure the data, not ε), ε drawn per particle, ξ not carried across
    unrolls (truncated ES: biased), ξ carried into the next optimizee."""
    from test_l2o_meta import tiny_cfg

    from raysub.l2o.optimizee import OptimizeeWorker, pes_noise
    from raysub.l2o.setup import initial_phi, l2o_problems

    cfg = tiny_cfg(tmp_path, "l2o.estimator=pes", "l2o.pes_sigma=0.05", "l2o.steps=4", "l2o.unroll=2",
                   "l2o.optimizees=2", "l2o.actors=1")
    w = OptimizeeWorker(cfg.to_dict(), [0, 1])
    a, b = w.live[0], w.live[1]
    assert (a.seed, a.horizon) == (b.seed, b.horizon) and torch.equal(a.z, b.z)
    phi = initial_phi(cfg)
    r1 = w.unroll(phi, meta_step=7)
    e7 = pes_noise(phi, cfg.l2o.seed, 7, 0, 0.05)
    assert [r["pes"]["sign"] for r in r1] == [1, -1] and r1[0]["grads"] is None
    assert r1[0]["losses"] != r1[1]["losses"]  # the halves step differently: φ ± ε
    r2 = w.unroll(phi, meta_step=8)
    e8 = pes_noise(phi, cfg.l2o.seed, 8, 0, 0.05)
    for k in phi:
        torch.testing.assert_close(r2[0]["pes"]["xi"][k], e7[k] + e8[k])
        torch.testing.assert_close(r2[1]["pes"]["xi"][k], -(e7[k] + e8[k]))
    assert r2[0]["done"] and r2[1]["done"] and w.live[0].xi is None and w.live[0].seed == w.live[1].seed != a.seed
    odd = tiny_cfg(tmp_path, "l2o.estimator=pes", "l2o.optimizees=3", "l2o.actors=1")
    assert any("antithetic pairs" in p for p in l2o_problems(odd))


def test_the_registry_l2o_takes_another_tasks_adam_lr_for_adam_schedule_weights(tmp_path):
    """train.optimizer_options.adam_lr moves an adam_schedule φ to another task's tuned Adam lr: at its zero start
    the step is Adam's at that lr. Catches the override ignored (φ's meta-training lr used on a task where it
    diverges) or accepted for lstm weights, where it means nothing."""
    from raysub.config import TrainConfig
    from raysub.l2o.weights import save_learned_optimizer
    from raysub.optim import build_optimizer

    config = LearnedOptimizerConfig(hidden_size=2, features=("m", "g"), rule="adam_schedule", adam_lr=0.1,
                                    beta1=0.9, beta2=0.999)
    phi = init_params(config)
    phi["out.weight"].zero_()
    phi["sched.weight"].zero_()
    weights = str(tmp_path / "w.pt")
    save_learned_optimizer(weights, config, phi)
    z = torch.zeros(3)
    opt = build_optimizer("l2o", z, TrainConfig(optimizer="l2o", lr=1.0, optimizer_options={
        "weights": weights, "adam_lr": 0.02, "horizon": 10}))  # its learned schedule reads the fraction done
    opt.step(z, torch.tensor([1.0, -2.0, 0.5]), 1.0)
    assert z.tolist() == pytest.approx([-0.02, 0.02, -0.02], rel=1e-5)  # Adam's first step: lr·sign(g)
    lstm_config = LearnedOptimizerConfig(hidden_size=2)
    save_learned_optimizer(weights, lstm_config, init_params(lstm_config))
    with pytest.raises(ConfigError, match="adam_schedule weights only"):
        build_optimizer("l2o", z, TrainConfig(optimizer="l2o", lr=1.0,
                                              optimizer_options={"weights": weights, "adam_lr": 0.02}))


def test_the_learned_schedule_is_piecewise_linear_in_the_fraction_done():
    """sched.weight = log-multipliers at the knots 0, ¼, ½, ¾, 1 of the fraction done: −2 at ½ gives e^−2 at
    progress ½ and e^−1 at ⅜ (halfway to the knot before), e^0 at 0. Catches progress taken after the step, knots
    interpolated in the wrong pair, the schedule applied outside the cap."""
    config = LearnedOptimizerConfig(hidden_size=2, features=("m", "progress"), rule="adam_schedule", adam_lr=1.0,
                                    beta1=0.0, beta2=0.0, eps=1e-30)
    phi = {k: torch.zeros(s, dtype=torch.float64) for k, s in lstm.param_shapes(config).items()}
    phi["sched.weight"][2] = -2.0
    knots = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    assert [float(lstm.schedule_value(knots, p)) for p in (0.0, 0.375, 0.5, 0.9, 1.0, 1.5)] == pytest.approx(
        [1.0, 3.0, 4.0, 12.8, 16.0, 16.0])
    g = torch.tensor([3.0], dtype=torch.float64)
    for t, want in ((1, 1.0), (4, math.exp(-1.0)), (5, math.exp(-2.0)), (9, 1.0)):  # horizon 8: p = (t − 1)/8
        state = init_state(config, 1, torch.float64, horizon=8)
        state["t"] = t - 1
        delta, _ = update(phi, config, g, state)
        assert float(delta) == pytest.approx(-want), t
    phi["sched.weight"][4] = -40.0
    state = init_state(config, 1, torch.float64, horizon=8)
    state["t"] = 8
    assert float(update(phi, config, g, state)[0]) == pytest.approx(-math.exp(-lstm.MAX_LOG_SCALE))


def test_adam_schedule_weights_from_before_the_learned_schedule_load_with_a_flat_one(tmp_path):
    """Weights written before sched.weight existed (their digest over the tensors they have) load with a zero
    schedule. Catches a refusal ('missing sched.weight') or a digest recomputed over the filled-in tensors."""
    from raysub.l2o.weights import content_digest, load_learned_optimizer

    config = LearnedOptimizerConfig(hidden_size=2, features=("m",), rule="adam_schedule")
    params = {k: v for k, v in init_params(config).items() if k != "sched.weight"}
    old = {k: v for k, v in config.to_dict().items() if k != "max_log_scale"}  # neither existed then
    blob = {"config": old, "params": params, "sha256": content_digest(old, params)}
    torch.save(blob, tmp_path / "old.pt")
    loaded_config, loaded = load_learned_optimizer(str(tmp_path / "old.pt"))
    assert loaded_config.rule == "adam_schedule" and loaded["sched.weight"].tolist() == [0.0] * 5
    assert loaded_config.max_log_scale == 3.0 and loaded_config.needs_horizon  # the cap they were trained under
    assert torch.equal(loaded["out.weight"], params["out.weight"])
