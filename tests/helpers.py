"""Helpers shared by several test modules (imported as ``from helpers import ...``: pytest puts tests/ on the path).
"""
import contextlib
import os
from typing import Dict, Union

import numpy as np

from raysub.pipeline.sample import collect_trajectory
from raysub.checksums import checksum
from raysub.storage import RunDir, decode_vector


def trajectory(run: Union[str, RunDir]) -> np.ndarray:
    """The T×N trajectory of a run (a path, URI or `RunDir`) reassembled from its blocks, every snapshot read
    against its checksum; asserts that each block's index lists its snapshots exactly once, in order."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    blocks, _ = collect_trajectory(run)
    for b in blocks:
        index = run.read_json(f"trajectory/block_{b['block']:03d}/index.json")["snapshots"]
        assert [s["snapshot"] for s in index] == list(range(len(index))), [s["snapshot"] for s in index]
    return np.stack([np.concatenate([decode_vector(run.read_bytes(b["snapshots"][s]["path"], b["snapshots"][s]["sha256"]))
                                     for b in blocks]) for s in range(len(blocks[0]["snapshots"]))])


def tree(root) -> Dict[str, str]:
    """What is under ``root``, to compare before and after a command: {relative path: checksum (raysub's, as the
    manifest records it)} of every file and
    {relative path + "/": ""} of every directory (an empty folder left behind counts); {} when ``root`` is missing."""
    out: Dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        out[os.path.relpath(dirpath, root) + "/"] = ""
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = checksum(f.read())
    return out


# Credentials written into storage URIs by the tests of issue 23 (tests/test_secrets.py, tests/test_s3.py's run):
# nothing raysub prints or stores may hold them.
KEY, SECRET, TOKEN = "AKIAKNOWNKEY", "SeCrEtKnOwN", "ToKeNkNoWn"
SECRETS = (KEY, SECRET, TOKEN)


def assert_clean(text, where: str) -> None:
    """Fails naming ``where`` if ``text`` (str or bytes) holds one of ``SECRETS``."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    for secret in SECRETS:
        assert secret not in text, f"{secret} in {where}: {text[:2000]}"


def written_since(t0: float, roots) -> Dict[str, bytes]:
    """{path: bytes} of every file under ``roots`` modified since ``t0`` (below 64 MiB): what a command wrote."""
    out = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    if os.path.getmtime(path) >= t0 and os.path.getsize(path) < 64 << 20:
                        with open(path, "rb") as f:
                            out[path] = f.read()
                except OSError:
                    pass
    return out



# -- the loopback S3 server (moto's threaded server, 127.0.0.1 only; tests/test_s3.py, tests/test_image_stream.py) --
BUCKET = "raysub-test"


class S3:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.query = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    def uri(self, path: str) -> str:
        return f"s3://{BUCKET}/{path}{self.query}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self.host}:{self.port}", region_name="us-east-1")

    def keys(self, prefix: str):
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def upload(self, folder, prefix: str) -> int:
        """Every file under ``folder`` to ``prefix/<relative path>``; returns the count."""
        client, n = self.client(), 0
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                key = f"{prefix}/{os.path.relpath(path, folder)}".replace(os.sep, "/")
                client.upload_file(path, BUCKET, key)
                n += 1
        return n


@contextlib.contextmanager
def loopback_s3():
    """A moto S3 server on 127.0.0.1 with the bucket ``BUCKET``, stopped on exit."""
    from moto import server as moto_server

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        out = S3(host, port)
        out.client().create_bucket(Bucket=BUCKET)
        yield out
    finally:
        server.stop()
