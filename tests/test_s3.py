"""Run directories on object storage, against a real S3-protocol server on loopback (moto's threaded server).

The server runs in this process's threads, listens on 127.0.0.1 on a free port and is stopped at the end of the
module. Ray's workers reach it through the endpoint in the run directory's URI query; the credentials come from
the environment (tests/conftest.py sets fake ones before Ray starts). What each test would catch:

* the URI helpers: a query concatenated after a path (``s3://b/run?endpoint_override=h/checkpoints``), which sends
  every file to the wrong key and the endpoint to nowhere;
* the pipeline on s3: Ray Train's checkpoints written through a concatenated ``storage_path`` string (the endpoint
  lost: Ray then talks to AWS), a stage that writes through the local filesystem, a resume that does not find its
  checkpoints on s3 — and anything that makes the s3 run differ from the same run on a local disk (bit-exact);
* the failed run before the resume (a worker's error, no restart): a traceback or a line that drops the worker's
  error or the command that continues, a stage marked complete, an existing run rerun without ``--resume``;
* credentials in the run's URIs (userinfo, query) that anything prints or stores (issue 23; the other credential
  tests are in tests/test_secrets.py);
* a corrupted object: a checksum that is not verified on the s3 read path;
* unreachable / unauthorised storage: a raw pyarrow traceback, or Ray started before the error.
"""
import contextlib
import io
import os
import socket

import numpy as np
import pytest

from raysub.storage import RunDir, join_uri, redact, split_uri

from helpers import BUCKET, KEY, SECRET, assert_clean, loopback_s3, trajectory, written_since  # tests/helpers.py
from conftest import QUICKSTART_SMALL  # tests/conftest.py: the shared quickstart_run's overrides

moto_server = pytest.importorskip("moto.server", reason="moto[server] (pip install -e .[test]) runs the S3 server")

SMALL = QUICKSTART_SMALL  # the shortened quickstart: the local run is the session's quickstart_run


# -- URI helpers (no server) ------------------------------------------------------------------------------
def test_join_uri_keeps_the_query_at_the_end():
    q = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(f"s3://b/run{q}", "checkpoints") == f"s3://b/run/checkpoints{q}"
    assert join_uri(f"s3://b/run/{q}", "tune", "x") == f"s3://b/run/tune/x{q}"
    assert join_uri("s3://b/run", "a") == "s3://b/run/a"
    assert join_uri("/tmp/run", "a", "b") == "/tmp/run/a/b"
    assert split_uri(f"s3://b/run/weights.pt{q}") == (f"s3://b/run{q}", "weights.pt")
    assert split_uri("/tmp/run/weights.pt") == ("/tmp/run", "weights.pt")
    assert redact("s3://KEY:SECRET@b/run?x=1") == "s3://***@b/run?x=1"
    assert redact("s3://b/run?x=1") == "s3://b/run?x=1"


def test_ray_storage_hands_ray_the_filesystem_not_a_string(tmp_path):
    import pyarrow.fs as pafs

    assert RunDir(str(tmp_path)).ray_storage("checkpoints") == (str(tmp_path / "checkpoints"), None)
    run = RunDir("s3://bucket/a/run?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    path, fs = run.ray_storage("checkpoints")
    assert path == "bucket/a/run/checkpoints" and isinstance(fs, pafs.S3FileSystem)
    assert fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:9"  # what a pickled copy (Ray's) keeps
    assert run.child("tune", "x").root == "bucket/a/run/tune/x"


def test_a_malformed_uri_is_one_line():
    from raysub.errors import StorageError

    with pytest.raises(StorageError) as exc:
        RunDir("nosuchscheme://bucket/run")
    assert "\n" not in str(exc.value) and "nosuchscheme://bucket/run cannot be opened" in str(exc.value)


# -- the loopback S3 server (tests/helpers.py) -------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    with loopback_s3() as server:
        yield server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if a command gets as far as starting (or joining) Ray."""
    from raysub.engine import cluster

    def refuse(*a, **k):
        raise AssertionError("ensure_ray was called: the storage error must come before Ray starts")

    monkeypatch.setattr(cluster, "ensure_ray", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_unreachable_endpoint_is_one_line_before_ray(no_ray, capsys):
    from raysub.cli import main

    uri = f"s3://{BUCKET}/x?endpoint_override=127.0.0.1:{_free_port()}&scheme=http&region=us-east-1"
    assert main(["run", f"run_dir={uri}"]) == 2
    err = _one_line_error(capsys)
    assert "cannot be reached" in err and "endpoint" in err and "AWS_ACCESS_KEY_ID" in err


@pytest.mark.system  # moto's S3 server
def test_missing_bucket_and_refused_credentials_are_one_line_before_ray(s3, no_ray, capsys):
    from moto import settings

    from raysub.cli import main

    assert main(["run", f"run_dir=s3://no-such-bucket/x{s3.query}"]) == 2
    assert "not found" in _one_line_error(capsys)
    # the server checks signatures against its IAM users from now on: our access key is unknown to it
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        assert main(["basis", s3.uri("x")]) == 2
        err = _one_line_error(capsys)
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
    assert "cannot be reached" in err and ("403" in err or "denied" in err.lower() or "Forbidden" in err), err


@pytest.fixture(scope="module")
def s3_run(quickstart_run, s3):
    """The shortened quickstart twice: on a local disk (the session's ``quickstart_run``, shared with
    tests/test_pipeline.py), and on s3 killed after epoch 1 then resumed, with credentials written into its URIs
    (issue 23): in the userinfo (``s3://KEY:SECRET@bucket/run``) for the run that fails and the rerun that is
    refused, in the query for the resume. What each command returned and printed, and when the first started."""
    import time

    from raysub import credentials
    from raysub.cli import main

    def cli(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # what capsys would have read
            rc = main(list(args))
        return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}

    assert quickstart_run["rc"] == 0, quickstart_run["err"]
    local, local_s = str(quickstart_run["run_dir"]), quickstart_run["wall_s"]
    uri = s3.uri("runs/q")
    with_userinfo = uri.replace("s3://", f"s3://{KEY}:{SECRET}@")
    with_query = f"{uri}&access_key={KEY}&secret_key={SECRET}"
    mp = pytest.MonkeyPatch()
    # a URI's credentials are exported to the environment: the rest of the session gets the suite's fake ones back
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        mp.setenv(name, os.environ[name])
    mp.delenv("AWS_SESSION_TOKEN", raising=False)
    mp.setattr(credentials, "_adopted", {})
    t_start, t0 = time.time() - 1, time.perf_counter()
    try:
        mp.setenv("RAYSUB_FAIL_AFTER_EPOCH", "1")
        failed = cli("run", *SMALL, f"run_dir={with_userinfo}")
        mp.delenv("RAYSUB_FAIL_AFTER_EPOCH")
        failed.update(stages=list(RunDir(uri).read_json("manifest.json")["stages"]), logs=RunDir(uri).listdir("logs"))
        refused = cli("run", *SMALL, f"run_dir={with_userinfo}")  # neither --resume nor --overwrite
        resumed = cli("run", *SMALL, f"run_dir={with_query}", "--resume")
    finally:
        mp.undo()
    s3_s = time.perf_counter() - t0
    print(f"\nshortened quickstart: local {local_s:.1f} s; s3 (killed after epoch 1, resumed) {s3_s:.1f} s; "
          f"load {os.getloadavg()[0]:.2f}")
    return {"local": local, "uri": uri, "t_start": t_start,
            "commands": {"failed": failed, "refused": refused, "resumed": resumed}}


@pytest.mark.system  # moto's S3 server
def test_quickstart_on_s3_killed_and_resumed_equals_the_local_run(s3_run, s3, capsys):
    from raysub.pipeline.basis import load_basis

    failed, refused, resumed = (s3_run["commands"][k] for k in ("failed", "refused", "resumed"))
    assert failed["rc"] == 1 and resumed["rc"] == 0, (failed["err"], resumed["err"])
    # the failed run (a worker's error after epoch 1, no automatic restart): one line naming the worker's error and
    # ending with the command that continues, one error log, no stage marked complete; rerun without --resume or
    # --overwrite is refused
    lines = failed["err"].strip().splitlines()
    assert len(lines) == 1, lines
    assert "a Ray Train worker failed (RuntimeError: RAYSUB_FAIL_AFTER_EPOCH=1: injected failure" in lines[0]
    assert lines[0].endswith(" --resume") and "run_dir=" in lines[0] and "Traceback" not in lines[0]
    assert len(failed["logs"]) == 1 and "sample" not in failed["stages"]
    assert refused["rc"] == 2 and "--resume" in refused["err"]
    local, remote = RunDir(s3_run["local"]), RunDir(s3_run["uri"])
    np.testing.assert_array_equal(trajectory(remote), trajectory(local))
    np.testing.assert_array_equal(load_basis(remote), load_basis(local))
    a, b = local.read_json("summary.json"), remote.read_json("summary.json")
    for method in ("sgd", "psgd"):
        assert a["results"][method]["test_acc"] == b["results"][method]["test_acc"]
    keys = s3.keys("runs/q/")
    # Ray Train kept its checkpoints in the bucket (through the filesystem object, endpoint and all)
    assert any(k.startswith("runs/q/checkpoints/sample/") for k in keys)
    assert {"runs/q/manifest.json", "runs/q/summary.json", "runs/q/theta0.pt"} <= set(keys)
    assert not any(".tmp-" in k for k in keys) and "runs/q/raysub.lock" not in keys
    # the rerun line config.yaml carries (a quoted URI, query and all) works as written: every stage is done
    from raysub.cli import main

    first = remote.read_text("config.yaml").splitlines()[0]
    assert first.startswith(f"# resolved config of this run; rerun: raysub run '{s3_run['uri'].split('?')[0]}/config.yaml?")
    capsys.readouterr()
    assert main(["run", join_uri(s3_run["uri"], "config.yaml"), "--resume"]) == 0  # the environment's credentials
    later = capsys.readouterr()
    assert later.out.count("skipping") >= 2
    assert_clean(later.out + later.err, "the output of the clean URI's --resume")


@pytest.mark.system  # moto's S3 server
def test_the_s3_run_prints_and_stores_none_of_the_credentials_of_its_uris(s3_run, s3):
    """The s3 run's commands had the key and the secret in the userinfo (the failed run, the refused rerun) or the
    query (the resume): every object in the bucket, every local file raysub and this Ray session wrote meanwhile
    (error logs included) and everything printed (the one-line error, the --resume hint, progress lines, the last
    line) hold neither. Catches `redact` masking only the userinfo, and a workflow that stores ``cfg.run_dir``
    before replacing it by the clean URI."""
    import glob
    import tempfile

    import ray

    for name, command in s3_run["commands"].items():
        assert_clean(command["out"] + command["err"], f"the output of the {name} command")
    assert_clean(s3_run["commands"]["resumed"]["out"].rstrip().splitlines()[-1], "the last line")
    client = s3.client()
    objects = {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in s3.keys("")}
    assert "runs/q/config.yaml" in objects and "runs/q/manifest.json" in objects
    for key, body in objects.items():
        assert_clean(body, f"s3://{BUCKET}/{key}")
    session = ray._private.worker._global_node.get_session_dir_path()
    local = written_since(s3_run["t_start"], [session, *glob.glob(os.path.join(tempfile.gettempdir(), "raysub-*"))])
    for path, body in local.items():
        assert_clean(body, path)


@pytest.mark.system  # moto's S3 server
def test_a_corrupted_object_on_s3_is_refused_by_checksum(s3_run, s3, capsys):
    from raysub.cli import main

    key = "runs/q/trajectory/block_000/snap_00002.arrow"
    client = s3.client()
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x55
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    try:
        capsys.readouterr()
        assert main(["basis", s3_run["uri"], "basis.dim=2", "--overwrite"]) == 2
        err = _one_line_error(capsys)
        assert "snap_00002.arrow is corrupted" in err
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=original)
    assert RunDir(s3_run["uri"]).read_json("summary.json")["dim"] == 3  # the committed basis stayed in force


@pytest.mark.system  # moto's S3 server
def test_sweep_on_s3_keeps_tune_and_train_storage_in_the_bucket(ray_session, s3, capsys):
    """A sweep whose trials are TorchTrainers inside Tune: both Tune's experiment and each trial's Ray Train run
    keep their files in the bucket (a concatenated storage_path string would send them to AWS, or fail)."""
    import json

    from raysub.cli import main

    uri = s3.uri("sweeps/sw")
    rc = main(["sweep", "sweep_digits", "train.epochs=2", "train.lr_milestones=[]", "sweep.seeds=[0]",
               "sweep.refine=1", "sweep.families=[fastfood]", "sweep.dims=[50]", "sweep.baseline=0.97",
               "sweep.workers_per_trial=2", "cluster.cpus_per_worker=0.5", f"run_dir={uri}"])
    assert rc == 0, capsys.readouterr().err
    (t,) = RunDir(uri).read_json("results.json")["trials"]
    assert t["family"] == "fastfood" and t["epochs_run"] == 2
    keys = s3.keys("sweeps/sw/")
    (result,) = [k for k in keys if k.startswith("sweeps/sw/tune/coarse/") and k.endswith("/result.json")]
    body = s3.client().get_object(Bucket=BUCKET, Key=result)["Body"].read().decode()
    assert [json.loads(line)["epoch"] for line in body.splitlines()] == [1, 2]
    assert any(k.startswith("sweeps/sw/tune/train/") for k in keys)  # the trial's Train run, same bucket
