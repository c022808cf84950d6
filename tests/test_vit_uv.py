"""The ViT transfer workflow on real Ray (digits): a base ViT sampled with AdamW on 2 gloo DDP workers writes model.pt,
then a UV run from it (train.init_from) trains U, V and the head through the identity projection with the learned
optimizer's update, and with Adam† — one rank in the test's process (Ray Train's local mode, cluster.num_workers=0):
what is under test there is the reparametrisation and the job, not DDP, which the base's sampling and
tests/test_pipeline.py's parity runs cover."""
import pytest
import torch

from raysub import pipeline
from raysub.config import load_config
from raysub.checksums import checksum
from raysub.storage import RunDir

VIT = ["model.name=vit", "model.options={dim: 32, depth: 2, heads: 2}", "data.batch_size=64"]
BASE = VIT + ["data.batch_size=32", "sgd.optimizer=adamw", "sgd.lr=0.01", "sgd.weight_decay=0.01", "sgd.epochs=8",
              "sgd.lr_milestones=[]", "data.augment=false",
              "sample.epochs=1", "sample.snapshot_every_steps=5", "basis.dim=2", "cluster.num_workers=2"]
UV = VIT + ["model.uv.rank=4", "train.projection=identity", "train.epochs=2", "train.lr_milestones=[]",
            "cluster.num_workers=0", "data.classes=[0,1,2,3,4]"]


def quiet(_line):
    pass


@pytest.fixture(scope="module")
def base(ray_session, tmp_path_factory):
    cfg = load_config(None, BASE + [f"run_dir={tmp_path_factory.mktemp('vit')}/base"])
    pipeline.stage_sample(cfg, say=quiet)
    return RunDir(cfg.run_dir)


def test_sample_commits_the_trained_model(base):
    """model.pt is the model when SGD ends (not θ0, not the sampling window's end): its test accuracy is the last
    epoch's, and the manifest commits its sha256."""
    from raysub.data import open_dataset
    from raysub.engine import loop
    from raysub.models import model_for

    manifest = base.read_json("manifest.json")
    sha = manifest["shards"]["model.pt"]
    assert sha == checksum(base.read_bytes("model.pt"))
    cfg = load_config(None, BASE + [f"run_dir={base.uri}"])
    data = open_dataset(cfg)
    model = model_for(cfg, data)
    model.load_state_dict(base.read_torch("model.pt", sha))
    model.eval()
    acc = loop.evaluate(model, data, "test", 1024, torch.device("cpu"))["acc"]
    history = manifest["summary"]["results"]["sgd"]["history"]
    assert len(history) == 8 and acc == pytest.approx(history[-1]["test_acc"], abs=1e-9)
    assert history[-1]["test_acc"] > 0.6  # AdamW trained the ViT (10 classes: chance is 0.1)


def test_uv_run_from_the_base_trains_u_v_and_head_only(base, tmp_path):
    """UV fine-tuning (one rank, local mode): θ0 holds the base's weights as frozen W0 (the head too: fresh, since the
    class count changed from 10 to 5), the trained vector is exactly U, V and the head, and the learned optimizer's
    update (φ = the hand-built Adam-like LSTM) lowers the loss with no special case."""
    from raysub.config import Config
    from raysub.l2o.lstm import LearnedOptimizerConfig, adam_like_params
    from raysub.l2o.weights import save_learned_optimizer

    weights = str(tmp_path / "phi.pt")
    config = LearnedOptimizerConfig(hidden_size=4, features=("m", "g"), step_scale=1.0)
    save_learned_optimizer(weights, config, adam_like_params(config, gain=0.003))
    cfg = load_config(None, UV + [f"run_dir={tmp_path}/uv", f"train.init_from={base.uri}", "train.optimizer=l2o",
                                  f"train.optimizer_options={{weights: {weights}}}", "train.lr=1.0"])
    result = pipeline.train_from_config(cfg, say=quiet)
    run = RunDir(cfg.run_dir)
    manifest = run.read_json("manifest.json")
    n_uv = 2 * 4 * (32 + 32) * 4 + 32 * 5 + 5  # 2 blocks × 4 projections × (d1 + d2)·r, the 5-class head
    assert result["dim"] == manifest["num_params"] == n_uv
    assert manifest["init_from"]["sha256"] == base.read_json("manifest.json")["shards"]["model.pt"]
    assert manifest["init_from"]["fresh"] == ["head.weight", "head.bias"]
    theta0 = run.read_theta0()
    trained = base.read_torch("model.pt")
    for k, v in trained.items():
        if not k.startswith("head."):
            assert torch.equal(theta0[k], v), k  # W0 (and every other frozen weight) is the base's, bit for bit
    assert torch.equal(theta0["blocks.1.attn.out.V"], torch.zeros(4, 32))
    z = run.read_torch("train/l2o.pt")["z"]
    assert z.numel() == n_uv and float(z.norm()) > 0
    losses = run.read_json("curves/l2o.json")["train_loss"]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert Config.from_dict(manifest["config"]).train.init_from == base.uri


def test_job_reuses_the_base_and_uv_fine_tunes_with_adam_dagger(base, tmp_path, capsys):
    """jobs/vit_uv.py on a finished base: the base is reused (not resampled: its manifest is unchanged; a base config
    that differs would be refused by the resume check, not reused), the UV run
    gets init_from = the base, and Adam† on U, V and the head reaches a useful accuracy on the 5 new classes within
    2 epochs (a run whose U, V never moved would sit near the fresh head's accuracy)."""
    import json

    from raysub.bench import vit_transfer as job

    before = base.read_bytes("manifest.json").to_pybytes()
    rc = job.main([base.path("config.yaml"), "quickstart", *UV, f"run_dir={tmp_path}/uv", "train.optimizer=adam",
                   "train.lr=0.003", "--base-set", f"run_dir={base.uri}"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err
    assert f"[sample] already complete in {base.uri}; skipping" in out
    assert base.read_bytes("manifest.json").to_pybytes() == before
    result = json.loads(out.strip().splitlines()[-1])
    assert result["base_run"] == base.uri and result["uv_optimizer"] == "adam"
    assert result["trainable"] == 2 * 4 * (32 + 32) * 4 + 32 * 5 + 5 and result["params_total"] > result["trainable"]
    assert RunDir(f"{tmp_path}/uv").read_json("manifest.json")["init_from"]["uri"] == base.uri
    assert result["uv_test_acc"] > 0.8
