"""Real job submission: a `ray start --head` cluster with token auth, `ray job submit --working-dir .` of
jobs/dldr.py, the run directory it leaves and the job's logs read back through the job client.

The head is this module's own cluster, not the shared `ray_session` one: started as a subprocess
(``ray start --head --block``) in its own process group, on loopback (node IP, dashboard and every port the test
picks free on 127.0.0.1), with a fresh token in its environment (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``: the
user's ~/.ray/auth_token is neither read nor written), a short temp dir under /tmp (Unix socket paths are limited to
107 bytes) and 4 logical CPUs. It is stopped by its pids at the end, whatever happened: never ``ray stop``, which
would stop every Ray cluster on the machine. This process never calls ``ray.init``; the ``ray`` CLI and the job
client run in subprocesses (the client caches the token it read, and this pytest process may hold the shared session).

Cost on the 2-core machine: 63 s in all when idle (head 6 s, quickstart job 41 s — mostly Ray Train start-up,
twice —, failing job 8 s, stop 5 s), ~120 s at load average 6-11. The measured submit → success round trip and the
load average are printed (``pytest -s`` shows them).
"""
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray")
pytestmark = [pytest.mark.system,  # its own `ray start --head` cluster and job-submission subprocesses
              pytest.mark.skipif(RAY is None, reason="the `ray` CLI is not on PATH (pip install 'ray[default]')")]

# The quickstart cut to 3 sampled epochs (7 snapshots with θ0), a 3-dim basis and 2 P-SGD epochs.
SMALL = ["sgd.epochs=3", "sample.epochs=3", "sample.snapshots_per_epoch=2", "basis.dim=3", "train.epochs=2",
         "sgd.lr_milestones=[]", "train.lr_milestones=[]"]
PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
         "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")

CLIENT = """
import json, sys
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
info = client.get_job_info(sys.argv[2])
print(json.dumps({"status": str(info.status.value), "message": info.message, "runtime_env": info.runtime_env,
                  "logs": client.get_job_logs(sys.argv[2])}))
"""


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (held open together so that none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def descendants(pid):
    """Every live process under ``pid`` (from /proc; Ray's workers start their own sessions, so the head's process
    group alone does not reach them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def listening_sockets(pids):
    """(local ip, port) of every TCP listener and unconnected UDP socket the processes ``pids`` hold, from /proc."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:  # gone, or not ours to read
            continue
    out = []
    for table, listen in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            local, remote, state, inode = f[1], f[2], f[3], f[9]
            if inode in inodes and state == listen and (table.startswith("tcp") or set(remote) <= {"0", ":"}):
                hex_ip, port = local.split(":")
                raw = bytes.fromhex(hex_ip)
                # /proc prints each 32-bit word of the address in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append((str(ipaddress.ip_address(raw)), int(port, 16)))
    return out


def is_loopback(ip):
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (as in tests/test_cluster_local.py)."""
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def http_status(url, token=None):
    """The HTTP status of a GET (None when nothing answers yet)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


class Head:
    """A `ray start --head --block` subprocess on loopback with token auth; `stop` kills it by its pids."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's Unix sockets live under it
        self.token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes: 256 random bits
        self.ports = dict(zip(PORTS, free_ports(len(PORTS))))
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.log_path = os.path.join(self.temp_dir + ".log")
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    # Ray's single-machine mode keeps the loopback node IP (cluster/local.md); jobs inherit it
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    # Train V2 drains reports on its health-check poll (2 s by default): a 0.2 s poll for the job
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                    "RAY_API_SERVER_ADDRESS": self.address}
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(key, None)
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--num-cpus=4", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               *(f"--{k}={v}" for k, v in self.ports.items())]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.temp_dir)

    def wait_ready(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            # the job API answers (401 without a token: auth is on) once the dashboard is up
            if "Ray runtime started" in self.log_text() and http_status(f"{self.address}/api/jobs/") is not None:
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray start did not come up in {timeout:.0f}s:\n{self.log_text()[-3000:]}")

    def log_text(self):
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self):
        """SIGTERM to the head's process group, then SIGKILL to the group and every process that was under it."""
        pids = descendants(self.proc.pid)
        pgid = self.proc.pid  # start_new_session: the `ray start` process leads its own group
        with_signal(lambda: os.killpg(pgid, signal.SIGTERM))
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with_signal(lambda: os.killpg(pgid, signal.SIGKILL))
        for pid in pids:
            with_signal(lambda: os.kill(pid, signal.SIGKILL))
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        Path(self.log_path).unlink(missing_ok=True)

    def submit(self, submission_id, args, timeout):
        """`ray job submit --working-dir . -- python jobs/dldr.py ARGS` from the repo root (waits for the end).
        Returns (the CompletedProcess, seconds from submit to the command's return)."""
        t0 = time.perf_counter()
        proc = subprocess.run([RAY, "job", "submit", "--address", self.address, "--submission-id", submission_id,
                               "--working-dir", ".", "--", "python", "jobs/dldr.py", *args],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        return proc, time.perf_counter() - t0

    def job_info(self, submission_id):
        """Status, message, runtime env and logs of a job, through `ray.job_submission.JobSubmissionClient`."""
        proc = subprocess.run([sys.executable, "-c", CLIENT, self.address, submission_id], env=self.env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])


def with_signal(fn):
    try:
        fn()
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def head():
    h = Head()
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


def loadavg():
    return Path("/proc/loadavg").read_text().strip()


def test_head_requires_the_token(head):
    """The head really has token auth on: the job API refuses a request without the token (HTTP 401) or with
    another one (403) and answers with it. Catches a head started without auth (e.g. RAY_AUTH_MODE not reaching it)."""
    url = f"{head.address}/api/jobs/"
    assert http_status(url) == 401
    assert http_status(url, token=secrets.token_hex(32)) == 403
    assert http_status(url, token=head.token) == 200


def test_head_listens_on_loopback_only(head):
    """Every socket the head's processes (GCS, raylet, dashboard, agents, client server, idle workers) accept
    connections on is on loopback. Catches a head started without --node-ip-address/single-machine mode (Ray then
    binds the GCS, raylet and agents to the machine's IP or all interfaces) or a dashboard on 0.0.0.0."""
    sockets = listening_sockets([head.proc.pid, *descendants(head.proc.pid)])
    ports = {port for _, port in sockets}
    assert {head.ports["port"], head.ports["dashboard-port"]} <= ports, sockets  # the listing saw the head
    assert [s for s in sockets if not is_loopback(s[0])] == []


def test_dldr_job_submission_round_trip(head, tmp_path):
    """`ray job submit --working-dir . -- python jobs/dldr.py ...` on the head runs the whole pipeline on that
    cluster: the job succeeds, the absolute run_dir holds a committed run (every stage complete, 7 snapshots from
    2 ranks, the basis generation the manifest names, the summary's three results), the job's logs read through
    the job client hold raysub's progress lines and the Train workers' own lines (which a driver that started a
    private cluster instead of joining would not stream), and .gitignore'd paths were not uploaded.
    Catches: a job that does not add cluster.address=auto, a relative run_dir resolution, token auth not reaching
    the submitted driver (it could not join), stages not committed."""
    run_dir = tmp_path / "quickstart"
    print(f"\nload average before submit: {loadavg()}")
    proc, wall = head.submit("raysub-dldr-ok", [f"run_dir={run_dir}", *SMALL], timeout=600)
    print(f"job submission round trip (submit -> succeeded): {wall:.1f} s; load average after: {loadavg()}")
    info = head.job_info("raysub-dldr-ok")
    assert proc.returncode == 0 and info["status"] == "SUCCEEDED", (
        f"rc {proc.returncode}, status {info['status']}: {info['message']}\n{info['logs'][-4000:]}")

    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = manifest["stages"]
    assert {k: v.get("complete") for k, v in stages.items()} == {"sample": True, "basis": True, "train.psgd": True}
    assert manifest["config"]["cluster"]["address"] == "auto"  # the job joined the head (raysub/launch.py)
    assert manifest["config"]["run_dir"] == str(run_dir)
    assert manifest["num_snapshots"] == 7 and manifest["world_size"] == 2
    basis = run_dir / stages["basis"]["dir"]
    assert (basis / "spectrum.json").is_file() and stages["basis"]["dim"] == 3
    assert all(p in manifest["shards"] for p in (f"{stages['basis']['dir']}/spectrum.json", "train/psgd.pt"))
    assert sorted(p.name for p in (run_dir / "trajectory").iterdir()) == ["block_000", "block_001"]
    assert set(summary["results"]) == {"sgd", "sgd@sample", "psgd"}
    assert summary["results"]["sgd"]["epochs"] == 3 and summary["results"]["psgd"]["epochs"] == 2
    assert summary["results"]["psgd"]["dim"] == 3 and 0.5 < summary["results"]["psgd"]["test_acc"] <= 1.0

    logs = info["logs"]
    for line in ("[sample] mlp on digits: 4,810 parameters, 2 workers, 7 snapshots over 3 epochs",
                 "[sgd] epoch 1/3", "[sgd] epoch 3/3", "[basis] top 3 components explain",
                 "[psgd] epoch 2/2", f"run directory: {run_dir}"):
        assert line in logs, f"{line!r} not in the job's logs:\n{logs[-4000:]}"
    assert re.search(r"\(RayTrainWorker pid=\d+\)", logs), logs[-4000:]
    assert "warning: run_dir" not in logs  # absolute run_dir: no relative-path warning

    pkg = re.fullmatch(r"gcs://(_ray_pkg_[0-9a-f]+)\.zip", info["runtime_env"]["working_dir"]).group(1)
    uploaded = Path(head.temp_dir, "session_latest", "runtime_resources", "working_dir_files", pkg)
    assert (uploaded / "jobs" / "dldr.py").is_file() and (uploaded / "raysub").is_dir()
    ignored = [p for p in ("runs", "raysub.egg-info", ".pytest_cache") if (uploaded / p).exists()]
    assert ignored == [], f"{ignored} uploaded although .gitignore'd"


def test_failing_job_ends_failed_with_one_line_error(head, tmp_path):
    """A job with a misspelt key ends FAILED (the driver's exit status 2 reaches the job server), and its log
    holds raysub's one-line error naming the key and the known ones, not a traceback; nothing is written."""
    run_dir = tmp_path / "bad"
    proc, wall = head.submit("raysub-dldr-bad", [f"run_dir={run_dir}", "sgd.nonsense=1"], timeout=300)
    info = head.job_info("raysub-dldr-bad")
    assert proc.returncode != 0 and info["status"] == "FAILED", (proc.returncode, info["status"])
    assert "exit code 2" in info["message"]
    errors = [line for line in info["logs"].splitlines() if line.startswith("raysub: error:")]
    assert errors == ["raysub: error: unknown key 'sgd.nonsense': known keys here are epochs, lr, optimizer, "
                      "momentum, weight_decay, lr_milestones, lr_gamma"], info["logs"][-3000:]
    assert "Traceback" not in info["logs"]
    assert not run_dir.exists()
    print(f"\nfailing job: submit -> FAILED in {wall:.1f} s")
