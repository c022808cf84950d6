"""The local Ray cluster raysub starts for a run listens on loopback only.

Ray is started in a subprocess: the test session shares one Ray session (tests/conftest.py), and ensure_ray must
start a fresh cluster to be tested. The subprocess runs one task (so worker processes exist), lists the sockets that
accept connections (TCP listeners, unconnected UDP) of the driver and every process under it — the GCS, raylet,
agents, autoscaler monitor, dashboard process, workers — and prints them as JSON.
"""
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, os
import ray
import psutil  # vendored by Ray: importable once ray is
from ray._private import ray_constants
from raysub.config import load_config
from raysub.engine.cluster import ensure_ray

multi_node_before = ray_constants.ENABLE_RAY_CLUSTER
ensure_ray(load_config(None, ["cluster.num_cpus=2"]))
ray.get(ray.remote(lambda: os.getpid()).remote())
driver = psutil.Process()
procs = {p.pid: p for p in driver.children(recursive=True)}
procs[driver.pid] = driver
sockets = []
for c in psutil.net_connections(kind="inet"):
    if c.pid in procs and (c.status == psutil.CONN_LISTEN or (c.type.name == "SOCK_DGRAM" and not c.raddr)):
        try:
            name = procs[c.pid].name()
        except psutil.Error:
            name = "?"
        sockets.append({"ip": c.laddr.ip, "port": c.laddr.port, "process": name})
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "sockets": sockets,
                  "multi_node_restored": ray_constants.ENABLE_RAY_CLUSTER == multi_node_before}))
ray.shutdown()
"""


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (``::ffff:127.0.0.1``: an IPv6 socket bound to 127.0.0.1)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_is_loopback_helper():
    """The check itself: all-interfaces and routable addresses are not loopback, mapped 127.0.0.1 is."""
    assert [is_loopback(ip) for ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1")] == [True, True, True]
    assert [is_loopback(ip) for ip in ("0.0.0.0", "::", "192.0.2.2", "fd00::2", "::ffff:192.0.2.2")] == [False] * 5


@pytest.mark.system  # a fresh Ray cluster in a subprocess
def test_local_cluster_listens_on_loopback_only():
    """Catches a local cluster reachable from the network: ensure_ray without a loopback node IP (Ray's default
    binds gRPC to ``::`` and the agents/metrics to 0.0.0.0 and the machine's IP), or passing
    ``_node_ip_address="127.0.0.1"`` alone (ray.init swaps a loopback node IP for the routable one); and a
    multi-node switch left off after start-up, which would break a later join from the same process."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {s["process"] for s in report["sockets"]}
    assert {"gcs_server", "raylet"} <= names, report  # the listing really saw the cluster's processes
    exposed = [s for s in report["sockets"] if not is_loopback(s["ip"])]
    assert exposed == [], exposed
    assert report["node_ip"] == "127.0.0.1"
    assert report["multi_node_restored"], "ensure_ray left ray_constants.ENABLE_RAY_CLUSTER switched"



def test_cluster_address_local_is_a_cluster_raysub_starts():
    """Ray's address "local" starts a new cluster like None does, so it gets the same loopback-only start-up;
    "auto" and an address join an existing cluster, whose bindings are its own."""
    from raysub.config import load_config
    from raysub.engine.cluster import starts_local

    assert [starts_local(load_config(None, [f"cluster.address={a}"])) for a in ("local", "auto", "ray://h:10001")] \
        == [True, False, False]
    assert starts_local(load_config(None, []))
