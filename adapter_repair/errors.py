"""Errors a user can act on.

Every error raised for bad input is an :class:`AdapterRepairError` carrying two parts: what is
wrong and what to do about it. The CLI prints both and exits non-zero; Python callers can catch
the one class.
"""

from __future__ import annotations

#: The exit code of a repair that ran to its end but did not reach its target (the adapter and
#: its report are written; nothing is pushed unless asked): not bad input (2), not success (0).
NOT_REPAIRED_EXIT_CODE = 3


class AdapterRepairError(Exception):
    """Bad input or an unsupported case, with the fix spelled out.

    Args:
        problem: what is wrong, naming the file, tensor or module concerned.
        fix: what the user can do about it.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


class AdapterFormatError(AdapterRepairError):
    """The adapter folder is missing files, malformed or unsafe to load."""


class UnsupportedAdapterError(AdapterRepairError):
    """A well-formed adapter of a kind adapter-repair does not repair (yet)."""


class BaseMismatchError(AdapterRepairError):
    """The adapter does not fit the base model it is being attached to."""


class UnsupportedModelError(AdapterRepairError):
    """The base model's structure could not be walked."""


class NothingToRepair(AdapterRepairError):
    """The adapter's harmful rate is already under the threshold asked for."""

    def __init__(self, harmful_rate: float, threshold: float) -> None:
        super().__init__(
            f"the adapter's harmful rate is {100 * harmful_rate:.1f}%, under the threshold of "
            f"{100 * threshold:.1f}%: nothing to repair.",
            "Lower the threshold to repair it anyway.",
        )
        self.harmful_rate = harmful_rate
        self.threshold = threshold
