"""Credentials written into a storage URI, bucket-less URIs and a stalled object store (issue 23).

Against the loopback S3 server of tests/test_s3.py (its own instance for this module); a whole run with credentials
in its URIs is tests/test_s3.py's s3 run (one Ray run serves both). What each test catches:

* a credential in the userinfo (``s3://KEY:SECRET@bucket/run``) or the query (``secret_key=``, ``access_key=``,
  ``session_token=``) that is printed (the last line, a one-line error, the ``--resume`` hint, a progress line)
  or stored (``config.yaml``, ``manifest.json``, the lock's command, an error log) — `redact` masking only the
  userinfo, a workflow that stores ``cfg.run_dir`` before replacing it by the clean URI;
* a clean URI that no longer authenticates once its credentials were split off (they must reach the
  environment);
* ``run_dir=s3://`` taken as a bucket named after the lock file, a bucket root taken as a run directory (its
  cleanup would act on the whole bucket): both must be a one-line bad input before Ray, nothing written;
* pyarrow's S3 filesystem without timeouts (a silent endpoint stalls every request ~100 s), or a timeout that
  reaches the user as pyarrow's raw words.
"""
import glob
import os
import socket
import tempfile
import threading
import time

import pytest

from raysub.storage import RunDir, redact

moto_server = pytest.importorskip("moto.server", reason="moto[server] (pip install -e .[test]) runs the S3 server")

from test_s3 import BUCKET, SMALL, no_ray, s3  # noqa: E402,F401  (the loopback server and its helpers)

from helpers import KEY, SECRET, TOKEN, assert_clean  # noqa: E402  (tests/helpers.py: the known credentials)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    """A URI's credentials are exported to the environment: give every test the suite's fake ones back."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAYSUB_STORAGE_TIMEOUT_S"):
        monkeypatch.setenv(name, os.environ.get(name, "raysub-test"))
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    monkeypatch.delenv("RAYSUB_STORAGE_TIMEOUT_S")
    try:
        from raysub import credentials
    except ImportError:  # the code before the fix: these tests show what it did
        return
    monkeypatch.setattr(credentials, "_adopted", {})


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert_clean(captured.out + captured.err, "the output")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


def bucket_bytes(s3) -> dict:
    client = s3.client()
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in s3.keys("")}


def error_logs() -> set:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "raysub-error-*")))


# -- the URI helpers (no server) --------------------------------------------------------------------------
def test_credentials_are_split_off_and_masked_in_userinfo_and_query():
    from raysub.credentials import mask, split_credentials

    q = "endpoint_override=h:9&scheme=http"
    assert split_credentials(f"s3://{KEY}:{SECRET}@b/run?{q}") == (f"s3://b/run?{q}", {"access_key": KEY,
                                                                                        "secret_key": SECRET})
    # an AWS secret key may hold '/' and '+' (written raw or URL-encoded); a path may hold '@'
    assert split_credentials(f"s3://{KEY}:a/b%2Bc@b/run") == ("s3://b/run", {"access_key": KEY,
                                                                            "secret_key": "a/b+c"})
    assert split_credentials("s3://b/run@v2?x=1") == ("s3://b/run@v2?x=1", {})
    uri = f"s3://b/run?{q}&Access_Key={KEY}&SECRET_KEY={SECRET}&session_token={TOKEN}"
    assert split_credentials(uri) == (f"s3://b/run?{q}", {"access_key": KEY, "secret_key": SECRET,
                                                          "session_token": TOKEN})
    for text in (redact(uri), redact(f"s3://{KEY}:{SECRET}@b/run"), mask(f"rerun: raysub run '{uri}' --resume")):
        assert_clean(text, "a masked URI")
    assert redact(f"s3://b/run?{q}") == f"s3://b/run?{q}"


def test_the_lock_records_the_command_without_credentials(monkeypatch):
    from raysub.lock import _command

    monkeypatch.setattr("sys.argv", ["raysub", "run", f"run_dir=s3://{KEY}:{SECRET}@b/run?secret_key={SECRET}"])
    assert _command() == "raysub run run_dir=s3://b/run"


# -- bad input: no bucket, a bucket root, a secret in the one-line error -----------------------------------
@pytest.mark.parametrize("uri, says", [("s3://", "names no bucket"), ("s3:///run", "names no bucket"),
                                       ("s3://BUCKET", "is a bucket root")])
@pytest.mark.system  # moto's S3 server
def test_a_uri_without_bucket_or_path_is_a_bad_input(uri, says, s3, no_ray, capsys):
    from raysub.cli import main

    uri = uri.replace("BUCKET", BUCKET) + s3.query
    before, logs = bucket_bytes(s3), error_logs()
    assert main(["run", f"run_dir={uri}"]) == 2
    err = one_line(capsys)
    assert says in err and "--resume" not in err and "raysub.lock" not in err, err
    assert bucket_bytes(s3) == before and error_logs() == logs


@pytest.mark.system  # moto's S3 server
def test_a_secret_in_the_query_is_masked_in_the_one_line_error(s3, no_ray, capsys):
    from raysub.cli import main

    uri = f"s3://no-such-bucket/x{s3.query}&access_key={KEY}&secret_key={SECRET}&session_token={TOKEN}"
    assert main(["run", f"run_dir={uri}"]) == 2
    assert "not found" in one_line(capsys)
    assert main(["run", f"run_dir=s3://{KEY}:{SECRET}@no-such-bucket/x{s3.query}"]) == 2
    assert "not found" in one_line(capsys)


@pytest.mark.system  # moto's S3 server
def test_credentials_given_only_in_the_uri_authenticate_and_a_clean_uri_reuses_them(s3, monkeypatch):
    """With the server checking signatures, a URI's credentials reach the filesystem (through the environment),
    and a clean URI of the same command (a worker's, a --resume's) authenticates with them."""
    import json

    from moto import settings

    from raysub.errors import StorageError

    import boto3

    iam = boto3.client("iam", endpoint_url=f"http://{s3.host}:{s3.port}", region_name="us-east-1")
    iam.create_user(UserName="raysub")
    iam.put_user_policy(UserName="raysub", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="raysub")["AccessKey"]
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(StorageError, match="cannot be reached"):  # the suite's fake key is refused now
        RunDir(s3.uri("auth")).probe()
    run = RunDir(f"s3://{key['AccessKeyId']}:{key['SecretAccessKey']}@{BUCKET}/auth{s3.query}")
    assert run.uri == s3.uri("auth")
    run.write_json("x.json", {"uri": f"s3://{key['AccessKeyId']}:{key['SecretAccessKey']}@{BUCKET}/auth"})
    assert RunDir(s3.uri("auth")).read_json("x.json") == {"uri": f"s3://{BUCKET}/auth"}  # stored clean


# -- a stalled object store --------------------------------------------------------------------------------
@pytest.fixture
def silent_endpoint():
    """A loopback TCP server that accepts connections and never answers (a stalled object store)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    conns = []

    def accept():
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"?endpoint_override=127.0.0.1:{srv.getsockname()[1]}&scheme=http&region=us-east-1"
    srv.close()
    for c in conns:
        c.close()


@pytest.mark.system  # a listening endpoint that never answers
def test_a_stalled_endpoint_fails_the_probe_within_the_timeout_in_one_line(silent_endpoint, no_ray, capsys,
                                                                          monkeypatch):
    from raysub.cli import main

    monkeypatch.setenv("RAYSUB_STORAGE_TIMEOUT_S", "1")
    out = []
    t0 = time.monotonic()
    worker = threading.Thread(target=lambda: out.append(main(["run", f"run_dir=s3://b/run{silent_endpoint}"])),
                              daemon=True)
    worker.start()
    worker.join(45)  # pyarrow's default: ~100 s of silent retries
    assert out == [2], f"still waiting after {time.monotonic() - t0:.0f} s"
    err = one_line(capsys)
    assert "did not answer within 1 s" in err and "RAYSUB_STORAGE_TIMEOUT_S" in err, err


@pytest.mark.system  # a listening endpoint that never answers
def test_a_stalled_call_prints_a_line_then_names_the_storage_and_the_timeout(silent_endpoint, capsys,
                                                                            monkeypatch):
    from raysub.storage import StorageTimeout

    monkeypatch.setenv("RAYSUB_STORAGE_TIMEOUT_S", "1")
    run = RunDir(f"s3://b/run{silent_endpoint}")
    t0 = time.monotonic()
    with pytest.raises(StorageTimeout) as exc:
        run.read_json("manifest.json")
    assert time.monotonic() - t0 < 30
    assert str(exc.value).startswith("storage s3://b/run?") and "did not answer within 1 s (read manifest.json" \
        in str(exc.value)
    assert "has not answered for 1 s (read manifest.json)" in capsys.readouterr().err


def test_a_bad_storage_timeout_is_one_line(no_ray, capsys, monkeypatch):
    from raysub.cli import main

    monkeypatch.setenv("RAYSUB_STORAGE_TIMEOUT_S", "soon")
    assert main(["run", "run_dir=s3://b/run?endpoint_override=127.0.0.1:9&scheme=http"]) == 2
    assert "RAYSUB_STORAGE_TIMEOUT_S=soon: must be a number of seconds > 0" in one_line(capsys)


# -- every byte a run writes and prints --------------------------------------------------------------------
def test_failure_lines_logs_and_the_job_launcher_mask_secrets(capsys, monkeypatch):
    """Defence in depth: a secret that reached an error's text (a pyarrow message, a traceback) or RAY_ADDRESS."""
    from raysub.cli import _write_log, describe_failure

    from raysub import launch as _launch

    exc = OSError(f"When reading s3://{KEY}:{SECRET}@b/run/x?secret_key={SECRET}: AWS Error NETWORK_CONNECTION "
                  f"during GetObject operation: curlCode: 28, Timeout was reached")
    line = describe_failure(exc)
    assert_clean(line, "the failure line")
    assert "the storage did not answer within 10 s (RAYSUB_STORAGE_TIMEOUT_S)" in line, line
    log = _write_log(None, exc)
    try:
        with open(log) as f:
            assert_clean(f.read(), log)
    finally:
        os.remove(log)
    monkeypatch.setenv("RAY_ADDRESS", f"http://{KEY}:{SECRET}@head:8265")
    assert _launch.run_cli("run", []) == 2
    assert "RAY_ADDRESS=http://***@head:8265" in one_line(capsys)


def test_tracking_params_carry_no_credential_of_a_uri_in_the_config(tmp_path):
    """A URI written into a YAML file (here the learned optimizer's weights) kept its credentials in the config
    dict that MLflow logs as the stage's params; the Tracker's params are stripped (the URI itself stays)."""
    from raysub.config import load_config
    from raysub.tracking import Tracker

    cfg = load_config(None, [f"run_dir={tmp_path}/run", "tracking.tensorboard=false"])
    cfg.train.optimizer_options = {"weights": "s3://AKIATRACKKEY:TrAcKsEcReT@bucket/w?secret_key=QsEcReTq&x=1"}
    tracker = Tracker(cfg, RunDir(cfg.run_dir), "train-psgd")
    text = repr(tracker.config)
    assert "TrAcKsEcReT" not in text and "AKIATRACKKEY" not in text and "QsEcReTq" not in text
    assert tracker.config["train"]["optimizer_options"]["weights"] == "s3://bucket/w?x=1"
