"""The test tiers of tests/conftest.py: every test in exactly one tier with its timeout, and the unit tier's guard
against Ray, subprocesses and servers."""
import socket
import subprocess
import sys

import pytest

import conftest

TIERS = ("unit", "integration", "system")


def test_every_selected_test_is_in_exactly_one_tier_with_its_timeout(request):
    """Catches a test in no tier (it would run in none of `-m unit`, `-m integration`, `-m system`), in two (it
    would run twice across them), and a tier without its timeout."""
    timeouts = request.config.pluginmanager.hasplugin("timeout")
    for item in request.session.items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        assert len(tiers) == 1, f"{item.nodeid} is in tiers {tiers}: mark it system, or leave it to conftest"
        if timeouts and not (item.get_closest_marker("slow") or item.get_closest_marker("gpu")):
            assert item.get_closest_marker("timeout") is not None, item.nodeid


def test_the_shared_ray_session_makes_a_test_integration(request):
    """Through another fixture too: the tier is read from the fixture closure, not the test's own arguments."""
    items = {item.nodeid: item for item in request.session.items}
    for item in items.values():
        if "ray_session" in item.fixturenames and not item.get_closest_marker("system"):
            assert item.get_closest_marker("integration"), item.nodeid
    assert items[request.node.nodeid].get_closest_marker("unit")  # this test itself uses no Ray


@pytest.mark.parametrize("start, what", [
    (lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), "started a subprocess"),
    (lambda: socket.socket().listen(), "started a server"),
    (lambda: __import__("ray").init(), "started Ray"),
])
def test_a_unit_test_that_starts_a_process_server_or_ray_fails_loudly(start, what):
    """The guard raises before anything starts (a BaseException, so `except Exception` in the code under test
    cannot hide it) and names the fix."""
    try:
        with pytest.raises(pytest.fail.Exception, match=f"a unit test {what}: mark it integration .* or system"):
            start()
    finally:
        conftest._violations.clear()  # expected here: not this test's failure


def test_a_machine_probe_is_no_process_a_test_starts():
    """`git` (the manifest's code revision) and `uname -p` (importing mlflow) run for milliseconds in unit tests."""
    assert subprocess.run(["uname", "-p"], capture_output=True).returncode == 0
