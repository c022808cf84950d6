"""User-facing errors.

`ConfigError` is what a user did wrong (a bad config value, a missing path, an unknown name). The CLI prints
its message as one line and exits non-zero; nothing else in raysub should catch it. Internal invariants use
`assert`.
"""


class ConfigError(ValueError):
    """A bad input, named with how to fix it. Holds one or more problems, reported together."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class DataError(ConfigError):
    """A dataset path that is missing or malformed."""


class StorageError(ConfigError):
    """A run directory or shard that is missing, corrupted or already there."""


class DivergedError(ConfigError):
    """Training diverged (a non-finite loss or parameters): names the stage, the epoch and what to change.

    The CLI exits with `EXIT_DIVERGED` for it (2 is a bad input, 130 an interrupt)."""


EXIT_DIVERGED = 3
