"""User-facing errors: one base, `RaysubError`, whose ``exit_code`` the CLI exits with.

Every error here is something the user can act on: the CLI prints its message as one line and exits with its
``exit_code``, with no special case per type; nothing else in raysub should catch them broadly. Internal
invariants use `assert`.

- `ConfigError` (exit 2): a bad input (a config value, a missing path, an unknown name); `DataError` is one.
- `StorageError` (exit 2): a run directory or shard that is missing, corrupted or already there.
- `RunLocked` (exit 2, defined in `raysub.lock`): the run directory is in use by another command.
- `DivergedError` (exit 3): training diverged.

Only `ConfigError` is a `ValueError` (a bad value); the others are not, so ``except ConfigError`` no longer
swallows a corrupted file or a lost lock: catch the type you mean.
"""
from typing import Iterable, Union

EXIT_BAD_INPUT = 2  # also argparse's exit status for a bad command line
EXIT_DIVERGED = 3  # 1 is an unexpected failure (traceback logged), 130 an interrupt


class RaysubError(Exception):
    """A failure the user can act on, named with how to fix it; holds one or more problems, reported together.

    The CLI prints ``'; '.join(problems)`` as one line and exits with ``exit_code``."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: Union[str, Iterable[str]]):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class ConfigError(RaysubError, ValueError):
    """A bad input, named with how to fix it."""

    exit_code = EXIT_BAD_INPUT


class DataError(ConfigError):
    """A dataset path that is missing or malformed."""


class StorageError(RaysubError):
    """A run directory or shard that is missing, corrupted or already there."""

    exit_code = EXIT_BAD_INPUT


class DivergedError(RaysubError):
    """Training diverged (a non-finite loss or parameters): names the stage, the epoch and what to change."""

    exit_code = EXIT_DIVERGED
