"""One error base with an exit code (issue 24 §7): the CLI prints any `RaysubError` in one line and exits with its
code; a storage fault, a lost lock or a divergence is no longer a `ConfigError` (an ``except ConfigError`` meant
for a bad value must not swallow them)."""
import pytest

from raysub import cli
from raysub.errors import ConfigError, DataError, DivergedError, RaysubError, StorageError
from raysub.lock import RunLock, RunLocked, fence
from raysub.storage import RunDir


def test_each_error_has_its_exit_code_and_only_bad_values_are_config_errors():
    """Mutation caught: StorageError, RunLocked or DivergedError subclassing ConfigError again."""
    assert issubclass(DataError, ConfigError) and issubclass(ConfigError, ValueError)
    for cls in (StorageError, RunLocked, DivergedError):
        assert issubclass(cls, RaysubError) and not issubclass(cls, ConfigError), cls
    assert [c.exit_code for c in (ConfigError, DataError, StorageError, RunLocked, DivergedError)] == [2, 2, 2, 2, 3]
    assert ConfigError(["a: fix it", "b: fix that"]).problems == ["a: fix it", "b: fix that"]
    assert str(StorageError("x is missing")) == "x is missing"


@pytest.mark.parametrize("error, code", [(ConfigError("bad: fix it"), 2), (StorageError("gone: rerun"), 2),
                                         (RunLocked("in use: wait"), 2), (DivergedError("nan: lower lr"), 3)])
def test_the_cli_prints_any_raysub_error_as_one_line_with_its_code(monkeypatch, capsys, error, code):
    def fail(ns):
        raise error

    monkeypatch.setattr(cli, "_dispatch", fail)
    assert cli.main(["basis", "/nowhere"]) == code
    err = capsys.readouterr().err
    assert err == f"raysub: error: {error}\n"


def test_the_cli_has_no_special_case_per_type(monkeypatch, capsys):
    """A new error type needs no CLI change: its own exit code is used (the old CLI returned 2 for anything but
    DivergedError)."""
    class Odd(RaysubError):
        exit_code = 7

    def fail(ns):
        raise Odd(["one", "two"])

    monkeypatch.setattr(cli, "_dispatch", fail)
    assert cli.main(["basis", "/nowhere"]) == 7
    assert capsys.readouterr().err == "raysub: error: one; two\n"


def test_a_missing_lock_file_is_read_as_no_lock(tmp_path):
    """`RunLock._read` and `fence` catch the StorageError of a missing file (not ConfigError, which it no longer
    is): no record, and a fence on a released lock says the lock is lost."""
    run = RunDir(str(tmp_path / "run"))
    run.makedirs()
    assert RunLock(run, "test")._read() is None
    with pytest.raises(RunLocked):
        fence(run, "some-token")
