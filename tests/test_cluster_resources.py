"""Fail fast on a cluster that can never hold the workers (raysub/engine/cluster.py check_resources), with
``cluster.wait_for_autoscaler`` turning the error into a warning on a joined cluster. Ray's view of the cluster
(``ray.cluster_resources``, ``ray.nodes``) is replaced by hand-written clusters: no Ray is started."""
from __future__ import annotations

import pytest
import ray

from raysub.config import load_config
from raysub.engine.cluster import check_resources
from raysub.errors import ConfigError


def node(cpus, gpus=0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {}),
                                          "memory": 1e10}}


@pytest.fixture
def cluster(monkeypatch):
    """Install a fake cluster: ``cluster(node(...), ...)``; totals are the live nodes' sums, as Ray reports them."""

    def install(*nodes):
        total = {}
        for n in nodes:
            if n["Alive"]:
                for k, v in n["Resources"].items():
                    total[k] = total.get(k, 0.0) + v
        monkeypatch.setattr(ray, "cluster_resources", lambda: dict(total))
        monkeypatch.setattr(ray, "nodes", lambda: list(nodes))

    return install


def cfg_of(*overrides, joined=True):
    return load_config(None, [*(["cluster.address=auto"] if joined else []), *overrides])


def refused(cfg, capsys) -> str:
    with pytest.raises(ConfigError) as e:
        check_resources(cfg)
    message = str(e.value)
    assert "\n" not in message and capsys.readouterr().err == ""
    return message


def test_gpus_asked_on_a_cluster_without_any(cluster, capsys):
    """Catches today's behaviour on a joined cluster: a warning, then Ray Train waiting forever for a GPU."""
    cluster(node(8), node(8))
    message = refused(cfg_of("cluster.use_gpu=true", "cluster.num_workers=2"), capsys)
    assert message.startswith("cluster.use_gpu=true but the Ray cluster has no GPUs (16 CPUs, 0 GPUs on 2 nodes)")
    assert "cluster.use_gpu=false" in message and "cluster.wait_for_autoscaler=true" in message


def test_no_node_fits_one_worker_though_the_total_does(cluster, capsys):
    """2 nodes × 2 CPUs hold 4 CPUs ≥ 3, but a worker's bundle (3 CPUs) must fit on one node. Catches a check on
    totals only."""
    cluster(node(2), node(2))
    message = refused(cfg_of("cluster.num_workers=1", "cluster.cpus_per_worker=3"), capsys)
    assert message.startswith("no node of the Ray cluster can hold one worker (cluster.cpus_per_worker=3: 3 CPUs on "
                              "one node; the largest node has 2 CPUs)")


def test_gpu_bundle_needs_cpus_and_gpu_on_the_same_node(cluster, capsys):
    """A big CPU node and a small GPU node: 2 CPUs + 1 GPU fit neither, though the totals (17 CPUs, 1 GPU) do."""
    cluster(node(16), node(1, gpus=1))
    message = refused(cfg_of("cluster.use_gpu=true", "cluster.num_workers=1", "cluster.cpus_per_worker=2"), capsys)
    assert message.startswith("no node of the Ray cluster can hold one worker (cluster.cpus_per_worker=2: 2 CPUs + 1 "
                              "GPU on one node; the largest node has 1 CPU, 1 GPU)")


def test_workers_packed_per_node(cluster, capsys):
    """2 nodes × 5 CPUs hold 10 ≥ 3 × 3 CPUs, but only one 3-CPU worker per node: 2 of 3. A dead node's CPUs do not
    count. Catches a sum of CPUs standing in for a count of worker slots."""
    cluster(node(5), node(5), node(64, alive=False))
    message = refused(cfg_of("cluster.num_workers=3", "cluster.cpus_per_worker=3"), capsys)
    assert message.startswith("cluster.num_workers=3 workers of 3 CPUs each do not fit: the Ray cluster (10 CPUs on 2 "
                              "nodes) holds at most 2")


@pytest.mark.parametrize("workers, fits", [(4, True), (5, False)])
def test_fractional_cpus_per_worker(cluster, capsys, workers, fits):
    """0.5 CPU per worker: a 2-CPU node holds exactly 4 (no float rounding loses or adds one)."""
    cluster(node(2))
    cfg = cfg_of(f"cluster.num_workers={workers}", "cluster.cpus_per_worker=0.5")
    if fits:
        check_resources(cfg)
        assert capsys.readouterr().err == ""
    else:
        assert "holds at most 4" in refused(cfg, capsys)


def test_a_cluster_that_fits_passes_silently(cluster, capsys):
    cluster(node(4, gpus=2), node(4, gpus=2))
    check_resources(cfg_of("cluster.use_gpu=true", "cluster.num_workers=4", "cluster.cpus_per_worker=2"))
    assert capsys.readouterr().err == ""


def test_wait_for_autoscaler_warns_and_goes_on(cluster, capsys):
    """With the option a joined cluster's shortfall is a warning (an autoscaler adds nodes when Ray Train asks);
    a local cluster has no autoscaler, so it is still refused there."""
    cluster(node(2), node(2))
    args = ("cluster.use_gpu=true", "cluster.num_workers=2", "cluster.wait_for_autoscaler=true")
    check_resources(cfg_of(*args))
    err = capsys.readouterr().err
    assert err.startswith("raysub: warning: cluster.use_gpu=true but the Ray cluster has no GPUs")
    assert "waiting for the autoscaler" in err and len(err.strip().splitlines()) == 1
    message = refused(cfg_of(*args, joined=False), capsys)
    assert "no GPUs" in message and "wait_for_autoscaler" not in message
