"""The sharded projection's pieces without processes (unit tier): the layout of ranks and slices, the choice of a
mode, the per-worker sizes and the one-line refusal, the rows a sharded worker builds or reads. The collectives
themselves run in real process worlds in tests/test_sharded_worlds.py and on Ray Train in tests/test_pipeline.py.
"""
import io

import numpy as np
import pytest
import torch

from raysub.config import load_config
from raysub.engine import sharded
from raysub.errors import ConfigError
from raysub.pipeline.plan import check_train_projection, sharding_plan
from raysub.projections import PROJECTIONS, stored_bytes
from raysub.projections.dense import materialize
from raysub.runs import basis as run_basis
from raysub.storage import RunDir


# -- layout ----------------------------------------------------------------------------------------------------------

def test_layout_of_three_ranks_on_ten_parameters():
    """Hand-computed: block_bounds(10, 3) = (0,3), (3,7), (7,10) (linspace rounding), chunk 4. Catches slices that
    do not tile the parameters (a gap or an overlap of one row) and a chunk taken from the first slice."""
    lay = sharded.layout_for("sharded", 10, 1, [[0, 1, 2]])
    assert lay.bounds == ((0, 3), (3, 7), (7, 10))
    assert (lay.rows, lay.index, lay.size, lay.chunk) == ((3, 7), 1, 3, 4)


def test_node_groups_follow_the_nodes_in_order_of_their_first_rank():
    """Ranks 0 and 2 on node b, 1 and 3 on node a: groups [[0, 2], [1, 3]]; rank 3 is index 1 of its group with the
    second slice. Catches groups ordered by node name (node a first would give rank 1's group index 0 on every rank
    of a, but another group order on b) and a rank's index taken from its world rank."""
    groups = sharded.groups_by_node(["b", "a", "b", "a"])
    assert groups == [[0, 2], [1, 3]]
    lay = sharded.layout_for("node", 100, 3, groups)
    assert (lay.world_ranks, lay.index, lay.rows) == ((1, 3), 1, (50, 100))
    assert sharded.consecutive_groups(4, 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        sharded.consecutive_groups(4, 3)


# -- the choice ------------------------------------------------------------------------------------------------------

def test_per_worker_bytes_and_auto():
    """P of 14 GB on 2 workers: replicated 14, sharded 7, node (1 worker per node) 14; 4 workers on 2 nodes: node 7,
    sharded 3.5. auto with a 9.6 GB budget: sharded on one node, node on two, replicated for a P that fits, and
    replicated for a family that stores nothing (p_bytes 0) whatever was asked. Catches a per-worker size divided by
    the node count instead of the node's workers, and auto picking by the whole P instead of the share."""
    gb = 10 ** 9
    assert sharded.per_worker_bytes("replicated", 14 * gb, 2, 1) == 14 * gb
    assert sharded.per_worker_bytes("sharded", 14 * gb, 2, 1) == 7 * gb
    assert sharded.per_worker_bytes("node", 14 * gb, 4, 2) == 7 * gb
    assert sharded.per_worker_bytes("sharded", 7, 2, 1) == 4  # the largest slice: ⌈7/2⌉
    budget = int(9.6 * gb)
    assert sharded.resolve_mode("auto", 14 * gb, budget, 2, 2, 1) == "sharded"
    assert sharded.resolve_mode("auto", 14 * gb, budget, 4, 2, 2) == "node"
    assert sharded.resolve_mode("auto", 30 * gb, budget, 4, 2, 2) == "sharded"  # a node's share (15) does not fit
    assert sharded.resolve_mode("auto", 5 * gb, budget, 2, 2, 1) == "replicated"
    assert sharded.resolve_mode("sharded", 0, budget, 2, 2, 1) == "replicated"
    assert sharded.resolve_mode("sharded", 5 * gb, budget, 1, 1, 1) == "replicated"  # one worker: nothing to shard


DEMO = ["model.name=mlp", "model.options={hidden: [7000, 7000]}", "data.name=fashion-mnist", "cluster.num_workers=2",
        "train.projection=dense", "train.dim=64", "train.projection_options={max_bytes: 30000000000}",
        "train.projection_budget_gb=9.6"]


def test_an_explicit_replicated_p_over_the_budget_is_refused_in_one_line():
    """The memory demonstration's numbers (54.6M parameters, d = 64, float32, 2 workers, a 9.6 GB budget): 14.0 GB
    replicated is refused, naming the fix with its size (7.0 GB sharded); auto resolves to sharded; sharded fits.
    Catches itemsize or d dropped from the size (0.2 GB: no refusal) and a refusal that names no fix."""
    n = 784 * 7000 + 7000 + 7000 * 7000 + 7000 + 7000 * 10 + 10
    cfg = load_config(None, DEMO + ["train.projection_sharding=replicated"])
    plan = sharding_plan(cfg, n, 64)
    assert plan["p_bytes"] == n * 64 * 4 and plan["per_worker"] == n * 64 * 4
    assert plan["problem"] == (
        f"train.projection_sharding=replicated: P (dense, N={n:,} × d=64 × 4 B) takes 14.0 GB per worker, above the "
        f"9.6 GB budget (train.projection_budget_gb): set train.projection_sharding=sharded (7.0 GB per worker) or "
        f"auto")
    with pytest.raises(ConfigError) as err:
        check_train_projection(cfg, n, RunDir("/nonexistent-run"), own_basis=False)
    assert str(err.value).count("\n") == 0 and "takes 14.0 GB per worker" in str(err.value)
    auto = sharding_plan(load_config(None, DEMO), n, 64)
    assert (auto["mode"], auto["per_worker"], auto["problem"]) == ("sharded", -(-n * 64 * 4 // 2), None)
    assert sharding_plan(load_config(None, DEMO + ["train.projection_sharding=sharded"]), n, 64)["problem"] is None


def test_the_default_budget_is_most_of_this_machine_over_its_workers():
    cfg = load_config(None, ["cluster.num_workers=2"])
    budget, how = sharded.budget_bytes(cfg, 2)
    assert budget == int(0.8 * sharded.host_memory_bytes() / 2)
    assert "over 2 workers" in how


def test_projection_groups_must_divide_the_workers():
    """Catches a check of the remainder the wrong way round (4 % 3 vs 3 % 4) and groups accepted for sharded."""
    from raysub.config import schema_problems

    assert schema_problems(load_config(None, ["cluster.num_workers=4", "train.projection_groups=3"])) == [
        "train.projection_groups=3: must divide cluster.num_workers=4 (each group is a node's consecutive ranks)"]
    assert schema_problems(load_config(None, ["cluster.num_workers=4", "train.projection_groups=2"])) == []
    assert "only applies to train.projection_sharding=node" in schema_problems(load_config(None, [
        "cluster.num_workers=4", "train.projection_groups=2", "train.projection_sharding=sharded"]))[0]


# -- the rows a worker builds or reads --------------------------------------------------------------------------------

def test_dense_rows_are_the_columns_of_the_whole_matrix_bit_for_bit():
    """Rows (5, 23) of a P drawn in chunks of 16 rows cross a chunk boundary. Catches a slice offset by the chunk's
    start (rows of the wrong chunk), norms taken over the slice only, and a block generated from the slice's own
    stream (different numbers)."""
    import raysub.projections.dense as dense

    old = dense.CHUNK_ROWS
    dense.CHUNK_ROWS = 16
    try:
        full = materialize(40, 3, 7, dtype=torch.float64)
        part = materialize(40, 3, 7, dtype=torch.float64, rows=(5, 23))
        proj = PROJECTIONS.get("dense")(40, 3, 7, dtype=torch.float64, rows=(5, 23))
    finally:
        dense.CHUNK_ROWS = old
    assert torch.equal(part, full[:, 5:23])
    assert torch.equal(proj.basis_DN, full[:, 5:23])
    assert stored_bytes("dense", 40, 3, {}, 4) == 480 and stored_bytes("dense", 40, 3, {"max_bytes": 479}, 4) == 0
    assert stored_bytes("fastjl", 40, 3, {}, 4) == 0


class _Counting(RunDir):
    read: list = []

    def read_bytes(self, rel, checksum=None):
        _Counting.read.append(rel)
        return super().read_bytes(rel, checksum)


def _write_basis(tmp_path, blocks):
    """A basis of 3 components over len(blocks) stored blocks at basis/spectrum.json (found there as in a run from
    before basis generations; no manifest: the blocks' own digests are checked)."""
    from raysub.storage import ColumnWriter

    run = RunDir(str(tmp_path / "run"))
    full = np.arange(3 * blocks[-1][1], dtype=np.float32).reshape(3, -1) / 7
    records = []
    for i, (a, b) in enumerate(blocks):
        rel = f"basis/block_{i:03d}.arrow"
        sink = io.BytesIO()
        writer = ColumnWriter(sink, 3)
        writer.write(full[:, a:b])
        writer.close()
        records.append({"block": i, "start": a, "stop": b, "path": rel, "sha256": run.write_bytes(rel, sink.getvalue())})
    run.write_json("basis/spectrum.json", {"dim": 3, "blocks": records, "singular_values": [3.0, 2.0, 1.0],
                                           "num_snapshots": 4})
    return run, full


def test_a_rank_reads_only_the_blocks_holding_its_rows(tmp_path):
    """Blocks (0,5), (5,10), (10,14): rows (5,10) read the second block only; rows (4,11) read all three and keep
    7 columns. Catches reading every block (the sharded memory and I/O goal lost), a slice offset by the block's
    start, and a partial block dropped at either edge."""
    run, full = _write_basis(tmp_path, [(0, 5), (5, 10), (10, 14)])
    _Counting.read = []
    part = run_basis.load_basis(_Counting(run.uri), 2, rows=(5, 10))
    assert [r for r in _Counting.read if r.endswith(".arrow")] == ["basis/block_001.arrow"]
    np.testing.assert_array_equal(part, full[:2, 5:10])
    _Counting.read = []
    part = run_basis.load_basis(_Counting(run.uri), 3, rows=(4, 11))
    assert len([r for r in _Counting.read if r.endswith(".arrow")]) == 3
    np.testing.assert_array_equal(part, full[:, 4:11])
    np.testing.assert_array_equal(run_basis.load_basis(run.uri, 3), full)


# -- local mode (cluster.num_workers=0) --------------------------------------------------------------------------------

def test_local_mode_is_one_rank_and_says_so():
    """cluster.num_workers=0 is Ray Train's local mode: a valid config, one rank for every size that divides by
    the workers (blocks, batch shares), and a first line that says the run is not tracked. Catches 0 workers used
    as a divisor (block_bounds(N, 0), a batch split 0 ways) and a silent loss of tracking."""
    from raysub.config import schema_problems
    from raysub.pipeline.run import workers_text
    from raysub.pipeline.sample_plan import stream_plan

    cfg = load_config(None, ["cluster.num_workers=0"])
    assert schema_problems(cfg) == [] and (cfg.ranks, cfg.local_mode) == (1, True)
    assert workers_text(cfg) == "local mode (one rank in this process, not tracked)"
    assert workers_text(load_config(None, ["cluster.num_workers=0", "tracking.tensorboard=false"])) == \
        "local mode (one rank in this process)"
    assert workers_text(load_config(None, ["cluster.num_workers=3"])) == "3 workers"
    assert schema_problems(load_config(None, ["cluster.num_workers=-1"])) == ["cluster.num_workers=-1: must be ≥ 0"]
    # one block of all N parameters (not a division by zero): 4,810 float32 × 20 snapshots fit 1 MB
    assert stream_plan(load_config(None, ["cluster.num_workers=0", "sample.stream_gram=true",
                                          "sample.stream_gram_budget_mb=1"]), 4810, 20) is None
