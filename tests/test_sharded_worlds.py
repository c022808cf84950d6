"""The sharded projection in real process worlds (gloo): every layout trains the same z (issue 25's equality table).

Worlds of 1–4 processes (`raysub.bench.sharded.run_world`: forked from one forkserver that imported torch once)
take 4 steps of P-SGD, P-BFGS, Adam†, the learned optimizer and class-gradient QN (its C+1 projected class
gradients each go through the reduce-scatter) through raysub's own ``train_step`` on a ResNet-8
(BatchNorm after every conv) in a stored 6-dim ``dense`` P, in float64: replicated on 1 and 2 ranks, sharded on 2
and 3 (3 does not divide N = 75,290: uneven slices, padded chunks), and ``node`` with 2 groups × 2 ranks. With
BatchNorm's statistics fixed (eval mode) every world computes one function and is compared with 1 rank. With
BatchNorm in train mode each rank normalises its own examples (as DDP does), so a layout is compared with replicated
on as many ranks: sharded on 2 (replicated on 3 and 4, only the references of the others' train-mode rows, are left
out to keep the suite short: what sharding changes, the slices and the collectives, the eval-mode rows check at every
world size).

What it catches: a slice's rows off by one (shown: the same world with every rank's rows shifted by one parameter
ends ≥ 1e-3 away), a partial projection summed twice or divided by the group instead of the world, an all-gather
that leaves a stale slice in θ, a node group's reduce-scatter over the wrong ranks, a P-BFGS trial that skips the
gather.
"""
import pytest
import torch

from raysub.bench import sharded as bench

pytestmark = pytest.mark.system  # worlds of forked processes with their own gloo groups

STEPS, DIM = 4, 6
N = 75_290  # ResNet-8 on 3×8×8 inputs, 10 classes
WORLDS = [("replicated", 1, None), ("replicated", 2, None), ("sharded", 2, None), ("sharded", 3, None), ("node", 4, 2)]
TOL64 = 1e-10
# float32: summation order differs between layouts (the reduce-scatter sums gradients before projecting them);
# P-BFGS's line search and the learned rule's tanh magnify that rounding over 4 steps
TOL32 = {"psgd": 1e-6, "adam": 1e-6, "l2o": 1e-4, "pbfgs": 1e-3, "cgqn": 1e-4}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from raysub.l2o import LearnedOptimizerConfig, adam_like_params, save_learned_optimizer

    path = str(tmp_path_factory.mktemp("l2o") / "weights.pt")
    config = LearnedOptimizerConfig(hidden_size=4, step_scale=0.1)
    save_learned_optimizer(path, config, adam_like_params(config))
    return path


@pytest.fixture(scope="module")
def results(weights):
    """Every world once, float64 and float32: {dtype: {(mode, W): rank 0's table}}."""
    out = {"float64": {}, "float32": {}}
    for mode, world, groups in WORLDS:
        both = bench.run_world(world, bench.equality_rank, mode, groups, ["float64", "float32"], STEPS, DIM, weights)[0]
        for dtype in out:
            out[dtype][(mode, world)] = both[dtype]
    return out


def _gap(a, b, key):
    return float((torch.tensor(a[key]["z"], dtype=torch.float64)
                  - torch.tensor(b[key]["z"], dtype=torch.float64)).abs().max())


def table(res):
    """max |Δz| of every layout and optimizer against its reference (printed with -s: the note's table)."""
    rows = {}
    for (mode, world), r in res.items():
        for key in (k for k in r if "/" in k):
            ref = res.get(("replicated", world if key.endswith("bn_train") else 1))
            if ref is not None:  # train-mode BatchNorm: a reference on as many ranks, where the suite runs one
                rows[(mode, world, key)] = _gap(r, ref, key)
    assert {(m, w) for m, w, _ in rows} == set(res)  # every world compared
    assert sum(1 for m, w, k in rows if k.endswith("bn_train") and m != "replicated") >= 5  # sharded W=2's rows
    return rows


def test_every_layout_trains_the_same_z_in_float64_and_a_misslice_would_show(results, weights):
    res = results["float64"]
    gaps = table(res)
    for (mode, world, key), gap in sorted(gaps.items()):
        print(f"float64 {mode:>10} W={world} {key:<14} max|Δz| {gap:.1e}")
    assert max(gaps.values()) <= TOL64, {k: v for k, v in gaps.items() if v > TOL64}
    for key in (k for k in res[("replicated", 1)] if "/" in k):  # the runs moved: equality is not 0 == 0
        assert float(torch.tensor(res[("replicated", 1)][key]["z"]).abs().max()) > 1e-3, key
    # what each rank held and sent, hand-computed: P is N×6 float64 (3,613,920 B); sharded over G ranks a rank
    # holds its slice (block_bounds: 37,645 rows of 2; 25,097 of 3 on rank 0); P-SGD sends D+1 = 7 floats in the
    # all-reduce (across nodes in node mode) and 2(G−1)·⌈N/G⌉ in the group's reduce-scatter and all-gather
    psgd = {k: r["psgd/bn_train"] for k, r in res.items()}
    assert psgd[("replicated", 1)]["p_bytes"] == N * DIM * 8
    assert psgd[("sharded", 2)]["p_bytes"] == 37_645 * DIM * 8
    assert psgd[("sharded", 3)]["p_bytes"] == 25_097 * DIM * 8
    assert psgd[("node", 4)]["p_bytes"] == 37_645 * DIM * 8
    assert [psgd[k]["allreduce_floats_per_step"] for k in [("replicated", 1), ("replicated", 2), ("sharded", 3),
                                                           ("node", 4)]] == [0, DIM + 1, DIM + 1, DIM + 1]
    assert psgd[("sharded", 2)]["group_floats_per_step"] == 2 * 1 * 37_645
    assert psgd[("sharded", 3)]["group_floats_per_step"] == 2 * 2 * 25_097
    assert psgd[("node", 4)]["group_floats_per_step"] == 2 * 1 * 37_645
    assert psgd[("replicated", 2)]["group_floats_per_step"] == 0
    # the same world with every rank's rows shifted by one parameter: far outside the tolerance, every optimizer
    shifted = bench.run_world(2, bench.equality_rank, "sharded", None, ["float64"], STEPS, DIM, weights,
                              1)[0]["float64"]
    for key in (k for k in shifted if "/" in k):
        ref = res[("replicated", 2 if key.endswith("bn_train") else 1)]
        assert _gap(shifted, ref, key) > 1e-3, key


def test_every_layout_trains_the_same_z_in_float32_within_the_stated_tolerance(results):
    gaps = table(results["float32"])
    for (mode, world, key), gap in sorted(gaps.items()):
        print(f"float32 {mode:>10} W={world} {key:<14} max|Δz| {gap:.1e}")
        assert gap <= TOL32[key.split("/")[0]], (mode, world, key, gap)
