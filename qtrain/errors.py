"""Errors a user can cause. Each one names the key/file/row and the fix.

The CLI turns any `QtrainError` into a message on stderr and exit code 2, with no
traceback; anything else is a bug in qtrain and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class QtrainError(Exception):
    """Base class for errors caused by user input (recipe, data, files)."""

    kind = "error"


class ConfigError(QtrainError):
    """A recipe is malformed: unknown key, wrong type, bad value, impossible combination.

    Holds every problem found, so one run reports all of them at once.
    """

    kind = "config error"

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"{self.problems[0]}{where}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{len(self.problems)} problems{where}:\n{lines}"
        super().__init__(text)


class DataError(QtrainError):
    """A dataset file is missing, unreadable, empty, or has rows without required fields."""

    kind = "data error"


class ModelError(QtrainError):
    """A model directory or model config cannot be loaded as asked."""

    kind = "model error"


class CheckpointError(QtrainError):
    """A checkpoint or adapter directory is missing, incomplete or corrupt."""

    kind = "checkpoint error"


# Exit codes of `qtrain train` besides 0 (success) and 2 (user error).
EXIT_NONFINITE = 3   # stopped on non-finite loss/gradients; the last good state was saved
EXIT_DISK_FULL = 74  # EX_IOERR: the disk filled while writing; the partial write was removed, the last checkpoint kept
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; run the same command again


class TrainingStopped(Exception):
    """The run stopped early on purpose; `exit_code` says why. Not a user error."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
