"""Shared fixtures. Ray integration tests share one session-scoped local Ray cluster (4 logical CPUs, so two
Train workers, the Train controller and the basis actors fit on a 2-core machine)."""
import os

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Credentials for the loopback S3 server of tests/test_s3.py, set before any Ray cluster starts so that its
# workers inherit them (a real cluster's nodes have their own, from the AWS default chain). No metadata lookups.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "raysub-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raysub-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from raysub.config import load_config
    from raysub.engine.cluster import ensure_ray

    if not ray.is_initialized():  # the cluster raysub starts for a run: loopback only, quiet
        ensure_ray(load_config(None, ["cluster.num_cpus=4"]))
    yield ray
    ray.shutdown()


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
