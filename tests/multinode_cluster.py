"""Run by tests/test_kills.py in a subprocess: raysub on a multi-node cluster simulated on this machine.

``ray.cluster_utils.Cluster`` starts a head (0 CPUs: nothing but the driver's bookkeeping lands there) and two
1-CPU worker nodes, each a raylet of its own, on loopback, under a temp dir of its own. Then, as a user would
with ``cluster.address``:

1. ``raysub sample`` with 2 workers of 1 CPU: one Train worker per node (the workers publish their node IDs via
   the RAYSUB_PID_DIR hook), both writing their blocks into one shared run directory;
2. ``raysub basis`` of it: the block actors are spread over the nodes (spectrum.json records each block's node);
3. a third node joins whose filesystem view differs from the driver's (RAYSUB_TEST_NODE_FS_ROOT): a run on a
   local path must then be refused in one line, before anything is written.

Prints one JSON line with what happened; the test checks it. Not a test module itself (no test_ prefix).
"""
import contextlib
import io
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(work: str, base) -> dict:
    from ray.cluster_utils import Cluster

    from raysub.cli import main as cli
    from raysub.pipeline.basis import basis_dir
    from raysub.storage import RunDir

    out: dict = {}
    temp = os.environ["RAY_TMPDIR"]  # short: Ray's socket paths have a length limit
    node = {"node_ip_address": "127.0.0.1", "temp_dir": temp}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(**node, num_cpus=1)
        cluster.wait_for_nodes()
        address = cluster.address
        pid_dir = os.path.join(work, "pids")
        os.makedirs(pid_dir)
        os.environ["RAYSUB_PID_DIR"] = pid_dir
        shared = os.path.join(work, "shared")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out["sample_rc"] = cli(["sample", *base, f"cluster.address={address}", f"run_dir={shared}"])
            out["basis_rc"] = cli(["basis", shared, f"cluster.address={address}"])
        out["sample_err"] = err.getvalue()[-2000:]
        del os.environ["RAYSUB_PID_DIR"]
        out["worker_nodes"] = {}
        for name in sorted(os.listdir(pid_dir)):
            if name.endswith(".json"):
                with open(os.path.join(pid_dir, name)) as f:
                    out["worker_nodes"][name[:-5]] = json.load(f)["node"]
        if out["basis_rc"] == 0:
            run = RunDir(shared)
            spectrum = run.read_json(f"{basis_dir(run)}/spectrum.json")
            out["basis_nodes"] = [b.get("node") for b in spectrum["blocks"]]
        out["shared"] = shared

        cluster.add_node(**node, num_cpus=1, env_vars={"RAYSUB_TEST_NODE_FS_ROOT": os.path.join(work, "elsewhere")})
        cluster.wait_for_nodes()
        err = io.StringIO()
        refused = os.path.join(work, "refused")
        with contextlib.redirect_stderr(err):
            out["refused_rc"] = cli(["sample", *base, f"cluster.address={address}", f"run_dir={refused}"])
        out["refused_err"] = err.getvalue()
        out["refused_exists"] = os.path.exists(refused)
    finally:
        import shutil

        import ray

        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return out


if __name__ == "__main__":
    # Before ray is imported: every node on loopback (Ray otherwise rewrites the head's 127.0.0.1 address to the
    # machine's routable IP for the nodes that join), and Ray's address file in a directory of our own rather
    # than /tmp/ray, where a later bare ray.init() on this machine would find it.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rsmn-", dir="/tmp")
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"))
    result = main(sys.argv[1], json.loads(sys.argv[2]))
    print(json.dumps(result))
