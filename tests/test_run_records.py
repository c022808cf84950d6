"""Run records (issue 23): the stages read what the manifest lists, a refused command writes nothing, config.yaml
names the directory it is in, a training in another run's basis starts from that run's θ0, train/LABEL.pt is
verified, and a resumed command removes the temporaries of killed writes.

Every run here is built without Ray (θ0 and manifest by `init_run`, a fake trajectory, basis and training
written and committed directly); Ray's start is replaced by a failure, so a command that would start it fails
the test instead of running a stage.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from raysub import cli, pipeline
from raysub.config import load_config
from raysub.lock import run_lock
from raysub.runs import records
from raysub.storage import ColumnWriter, RunDir, basis_rel, block_index_rel, encode_vector, snapshot_rel
from helpers import tree

T = 5  # snapshots of the fake trajectory


def same(a, b) -> bool:
    """Whether two state_dicts hold the same tensors."""
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """A command that gets as far as starting Ray is a stage this test did not mean to run."""
    import raysub.engine.cluster as cluster

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster, "ensure_ray", refuse)


def _basis(run: RunDir, manifest, gen: str, dim: int = 2) -> None:
    """A committed basis generation ``gen`` over the manifest's blocks (random columns; only its records matter)."""
    rng = np.random.default_rng(1)
    blocks = []
    for b in manifest.blocks:
        with run.open_writer(basis_rel(b["block"], gen)) as sink:
            w = ColumnWriter(sink, dim)
            w.write(rng.standard_normal((dim, b["stop"] - b["start"])))
            w.close()
        manifest.shards[basis_rel(b["block"], gen)] = sink.sha256
        blocks.append({**b, "path": basis_rel(b["block"], gen), "sha256": sink.sha256})
    spectrum = {"dim": dim, "num_snapshots": T, "rank": T - 1, "dtype": "float32",
                "singular_values": [1.0] * T, "explained_variance_ratio": [1.0 / T] * T,
                "explained_variance_top_dim": dim / T, "blocks": blocks, "gram_source": "posthoc"}
    manifest.shards[f"{gen}/spectrum.json"] = run.write_json(f"{gen}/spectrum.json", spectrum)
    manifest.stages["basis"] = {"complete": True, "dir": gen, "dim": dim, "gram_source": "posthoc"}


def sampled_run(root, name="run", seed=0, trained=True) -> RunDir:
    """A run with a complete 2-block trajectory, a basis and (``trained``) a psgd training in it."""
    cfg = load_config(None, [f"run_dir={root}/{name}", f"seed={seed}", "cluster.num_workers=2", "basis.dim=2",
                             "train.dim=2"])
    info = pipeline.plan.plan(cfg)
    run = RunDir(cfg.run_dir)
    cfg.run_dir = run.uri
    with run_lock(run):
        records.prepare_run_dir(run, False, False, cfg)
        manifest = records.init_run(cfg, info, False, False)
        rng = np.random.default_rng(0)
        for b in manifest.blocks:
            index = []
            for s in range(T):
                rel = snapshot_rel(b["block"], s)
                values = rng.standard_normal(b["stop"] - b["start"]).astype(np.float32)
                manifest.shards[rel] = run.write_bytes(rel, encode_vector(values))
                index.append({"snapshot": s, "step": s, "epoch": 0, "path": rel, "sha256": manifest.shards[rel]})
            rel = block_index_rel(b["block"])
            manifest.shards[rel] = run.write_json(rel, {**b, "snapshots": index})
        manifest.num_snapshots = T
        manifest.stages["sample"] = {"complete": True}
        _basis(run, manifest, "basis/g1")
        if trained:
            manifest.shards["train/psgd.pt"] = run.write_torch("train/psgd.pt", {"z": torch.ones(2), "dim": 2})
            manifest.stages["train.psgd"] = {"complete": True, "train": cfg.to_dict()["train"]}
            manifest.summary["results"]["psgd"] = {"test_acc": 0.9, "dim": 2, "epochs": 1, "wall_s": 1.0}
        records.commit(run, manifest)
    return run


def refused(argv, capsys, needle):
    """Run the CLI; it must exit 2 with one line holding ``needle`` and no traceback. Returns the line."""
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("raysub: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err.strip()


# ---------------------------------------------------------------------------------------------------------
# the stages read the blocks the manifest lists

def test_a_deleted_trajectory_block_is_refused_in_one_line_and_nothing_is_dropped(tmp_path, capsys):
    """`raysub basis RUN --overwrite` with block_001 deleted built a basis over block_000 alone (half the
    parameters) and dropped the run's training; it must refuse, naming the block, before Ray starts."""
    run = sampled_run(tmp_path)
    shutil.rmtree(tmp_path / "run" / "trajectory" / "block_001")
    before = tree(tmp_path / "run")
    line = refused(["basis", run.uri, "--overwrite"], capsys, "trajectory/block_001 is missing")
    assert "the manifest lists" in line and "--overwrite" in line
    assert tree(tmp_path / "run") == before


def test_a_deleted_snapshot_is_refused_before_ray_starts(tmp_path, capsys):
    """A block whose index names a snapshot that is gone: refused by listing, not found by a Ray actor half-way
    through the basis (whose other blocks' shards would already be written)."""
    run = sampled_run(tmp_path)
    os.remove(tmp_path / "run" / snapshot_rel(1, 3))
    before = tree(tmp_path / "run")
    refused(["basis", run.uri, "--overwrite"], capsys, "block_001/snap_00003.arrow is missing")
    assert tree(tmp_path / "run") == before


def test_blocks_are_the_manifests_a_directory_it_does_not_list_is_refused(tmp_path):
    """A block directory the manifest does not list is refused, never read; listed blocks that do not cover the
    vector from 0 are refused (not a basis over part of it); the layout's blocks must all be there."""
    from raysub.errors import StorageError
    from raysub.pipeline.sample import collect_trajectory

    run = sampled_run(tmp_path, trained=False)
    manifest = run.read_json("manifest.json")
    shards, layout = manifest["shards"], manifest["blocks"]
    blocks, _ = collect_trajectory(run, shards, layout)
    assert [b["block"] for b in blocks] == [0, 1]
    without0 = {k: v for k, v in shards.items() if not k.startswith("trajectory/block_000/")}
    with pytest.raises(StorageError, match="block_000/index.json has no checksum in the manifest"):
        collect_trajectory(run, without0)
    shutil.rmtree(tmp_path / "run" / "trajectory" / "block_000")
    with pytest.raises(StorageError, match="do not cover the parameter vector"):
        collect_trajectory(run, without0)
    with pytest.raises(StorageError, match="block_000 is missing, one of the 2 trajectory blocks"):
        collect_trajectory(run, without0, layout)


def test_a_basis_deleted_by_hand_is_named_as_missing(tmp_path, capsys):
    """After `rm -r RUN/basis` the message said the run 'already holds a basis'."""
    run = sampled_run(tmp_path)
    shutil.rmtree(tmp_path / "run" / "basis")
    before = tree(tmp_path / "run")
    line = refused(["basis", run.uri], capsys, "basis/g1, the basis the manifest commits, is missing")
    assert "already holds" not in line and "--overwrite" in line
    assert tree(tmp_path / "run") == before
    # with the basis there, the refusal names the generation that holds it
    other = sampled_run(tmp_path, "other")
    refused(["basis", other.uri], capsys, f"{other.uri}/basis/g1 already holds a basis")


# ---------------------------------------------------------------------------------------------------------
# a refused command writes nothing; config.yaml names the directory it is in

REFUSED = [
    (["basis", "{run}"], "already holds a basis"),
    (["basis", "{run}", "basis.dim=8", "--overwrite"], "basis.dim=8 must be in [1, 4]"),
    (["train", "{run}"], "already has results for 'psgd'"),
    (["train", "{run}", "train.lr=5", "--resume"], "train.lr"),
    (["train", "{run}", "train.label=x", "train.projection=nope"], "train.projection"),
    (["sample", "{run}/config.yaml", "run_dir={run}"], "already exists"),
    (["run", "{run}/config.yaml", "run_dir={run}", "seed=3", "--resume"], "seed (0 in the run, 3 now)"),
]


@pytest.mark.parametrize("argv, needle", REFUSED, ids=[" ".join(a[:1] + a[2:]) for a, _ in REFUSED])
def test_a_refused_command_on_a_copied_run_writes_nothing(tmp_path, capsys, argv, needle):
    """A copied run's config.yaml names the original; a refused command re-synced it (its first line rewritten)
    on the way to the refusal. Neither the copy nor the original may change."""
    sampled_run(tmp_path)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    before, original = tree(tmp_path / "copy"), tree(tmp_path / "run")
    refused([a.format(run=tmp_path / "copy") for a in argv], capsys, needle)
    assert tree(tmp_path / "copy") == before
    assert tree(tmp_path / "run") == original


def test_a_copied_run_s_config_names_its_own_directory_once_a_command_runs(tmp_path, capsys):
    """The re-synced copy of a moved run named the new file in its header and the old run_dir inside it: no
    header may name a file whose run_dir is elsewhere."""
    sampled_run(tmp_path)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    copy = RunDir(str(tmp_path / "copy"))
    assert cli.main(["sample", f"{copy.uri}/config.yaml", f"run_dir={copy.uri}", "--resume"]) == 0
    text = copy.read_text("config.yaml")
    assert text.splitlines()[0] == (f"# resolved config of this run; rerun: raysub run {copy.uri}/config.yaml "
                                    f"--overwrite")
    assert yaml.safe_load(text)["run_dir"] == copy.uri
    original = RunDir(str(tmp_path / "run")).read_text("config.yaml")
    assert yaml.safe_load(original)["run_dir"] == str(tmp_path / "run") and f"{tmp_path}/run/config" in original


# ---------------------------------------------------------------------------------------------------------
# θ0 of a training in another run's basis

def _fake_training(monkeypatch):
    """run_subspace replaced by a one-epoch result that writes the trained z (no Ray)."""
    import raysub.pipeline.train as train

    def fake(cfg, run, printer, sharding=""):
        rel = f"train/{cfg.train_label}.pt"
        sha = run.write_torch(rel, {"z": torch.zeros(cfg.train.dim), "dim": cfg.train.dim})
        return {"history": [{"epoch": 1, "test_acc": 0.5, "elapsed_s": 1.0, "allreduce_floats_per_step": 3}],
                "step_losses": [1.0], "wall_s": 1.0, "written": {rel: sha}}

    monkeypatch.setattr(train, "run_subspace", fake)
    import raysub.engine.cluster as cluster

    monkeypatch.setattr(cluster, "ensure_ray", lambda *a, **k: None)


def test_train_config_in_another_runs_basis_starts_from_that_runs_theta0(tmp_path, monkeypatch, capsys):
    """`raysub train CONFIG seed=7 train.basis_run=RUN0` wrote a seed-7 θ0 and trained around it in RUN0's
    basis (sampled around seed 0's θ0): 69% instead of 98%. It must use RUN0's θ0, whatever the seed."""
    base = sampled_run(tmp_path, "run0", trained=False)
    _fake_training(monkeypatch)
    config = tmp_path / "train.yaml"
    config.write_text(load_config(None, []).to_yaml())
    rc = cli.main(["train", str(config), f"run_dir={tmp_path}/new", "seed=7", f"train.basis_run={base.uri}",
                   "train.dim=2", "cluster.num_workers=1"])
    assert rc == 0, capsys.readouterr().err
    new = RunDir(str(tmp_path / "new"))
    theta0 = new.read_theta0()
    assert same(theta0, base.read_theta0())
    seeded = pipeline.plan.plan(load_config(None, ["seed=7"]))["model"].state_dict()
    assert not same(theta0, seeded)
    assert new.read_json("manifest.json")["theta0_from"]["run"] == base.uri


def test_a_corrupted_basis_run_theta0_is_refused(tmp_path, capsys):
    """The basis run's θ0 is read verified against its manifest (a concurrent run's θ0 passed unchecked)."""
    base = sampled_run(tmp_path, "run0", trained=False)
    base.write_torch("theta0.pt", {"x": torch.zeros(1)})
    config = tmp_path / "train.yaml"
    config.write_text(load_config(None, []).to_yaml())
    refused(["train", str(config), f"run_dir={tmp_path}/new", f"train.basis_run={base.uri}", "train.dim=2",
             "cluster.num_workers=1"], capsys, "run0/theta0.pt is corrupted")


# ---------------------------------------------------------------------------------------------------------
# train/LABEL.pt is verified

def test_a_corrupted_trained_z_is_refused_not_reported_complete(tmp_path, capsys):
    """`raysub train RUN --resume` said "[psgd] already complete; skipping" over a z that was not the one
    committed; it must verify train/psgd.pt against the manifest."""
    run = sampled_run(tmp_path)
    capsys.readouterr()
    assert cli.main(["train", run.uri, "--resume"]) == 0
    assert "already complete; skipping" in capsys.readouterr().out
    run.write_torch("train/psgd.pt", {"z": torch.full((2,), 5.0), "dim": 2})
    before = tree(tmp_path / "run")
    refused(["train", run.uri, "--resume"], capsys, "train/psgd.pt is corrupted")
    assert tree(tmp_path / "run") == before
    from raysub.errors import StorageError
    from raysub.pipeline.train import read_trained

    with pytest.raises(StorageError, match="psgd.pt is corrupted"):
        read_trained(run, "psgd")
    with pytest.raises(StorageError, match="nope.pt has no checksum"):
        read_trained(run, "nope")


# ---------------------------------------------------------------------------------------------------------
# temporaries of killed writes

def test_a_resumed_command_removes_the_temporaries_of_killed_writes(tmp_path, capsys):
    """Files `NAME.tmp-XXXXXXXX` of writes killed before their rename stayed behind after a successful resume."""
    run = sampled_run(tmp_path)
    before = tree(tmp_path / "run")
    leftovers = ["manifest.json.tmp-0badf00d", "trajectory/block_001/snap_00002.arrow.tmp-12345678",
                 "basis/g1/block_000.arrow.tmp-abcdef01"]
    for rel in leftovers:
        (tmp_path / "run" / rel).write_bytes(b"half a file")
    (tmp_path / "run" / "notes.tmp-draft").write_text("not ours")  # not a raysub temporary: kept
    assert cli.main(["sample", f"{run.uri}/config.yaml", f"run_dir={run.uri}", "--resume"]) == 0
    after = tree(tmp_path / "run")
    assert not any(rel in after for rel in leftovers)
    assert after == {**before, "notes.tmp-draft": after["notes.tmp-draft"]}


def test_training_a_run_in_another_runs_basis_needs_the_same_theta0(tmp_path, monkeypatch, capsys):
    """`raysub train RUN7 train.basis_run=RUN0` trained RUN7's seed-7 θ0 in RUN0's basis (sampled around seed 0's
    θ0) without a word; refused in one line with nothing written — and accepted when the θ0 are the same."""
    base = sampled_run(tmp_path, "run0", trained=False)
    other = sampled_run(tmp_path, "run7", seed=7, trained=False)
    before = tree(tmp_path)
    refused(["train", other.uri, f"train.basis_run={base.uri}", "train.label=in0"], capsys,
            "was sampled from another θ0 than")
    assert tree(tmp_path) == before
    twin = sampled_run(tmp_path, "twin", seed=0, trained=False)
    _fake_training(monkeypatch)
    assert cli.main(["train", twin.uri, f"train.basis_run={base.uri}", "train.label=in0"]) == 0, \
        capsys.readouterr().err
