"""Exception and warning hierarchy of hybridpk.

Every error a user can cause derives from :class:`HybridPKError` and also from the matching builtin
(``ValueError``), so generic handlers still catch it. Messages follow the pattern *what / where /
expected / got*, then how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HybridPKError", "DatasetError", "DatasetWarning", "Violation", "ModelError", "SolverError", "Interrupted"]


class HybridPKError(Exception):
    """Base class of every error raised by hybridpk for bad input or unusable state."""


@dataclass(frozen=True)
class Violation:
    """One problem found in a dataset.

    Attributes
    ----------
    rows : tuple of int
        1-based data-row numbers (the first record after the header is row 1); empty when the problem
        concerns the whole file or a whole column.
    column : str
        The column concerned, as spelled in the file ("" when none).
    message : str
        What is wrong and what was expected.
    lines : tuple of int
        File line numbers of the same rows (header = line 1), when read from a file.
    """

    rows: tuple[int, ...]
    column: str
    message: str
    lines: tuple[int, ...] = ()

    def __str__(self) -> str:
        where = []
        if self.rows:
            shown = ", ".join(str(r) for r in self.rows[:8])
            more = f" and {len(self.rows) - 8} more" if len(self.rows) > 8 else ""
            label = "row" if len(self.rows) == 1 else "rows"
            where.append(f"{label} {shown}{more}")
            if self.lines:
                lshown = ", ".join(str(r) for r in self.lines[:8])
                where[-1] += f" (file line{'s' if len(self.lines) > 1 else ''} {lshown}{'...' if more else ''})"
        if self.column:
            where.append(f"column {self.column}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class DatasetError(HybridPKError, ValueError):
    """The dataset cannot be used. ``violations`` lists every problem found, not only the first."""

    def __init__(self, violations: list[Violation] | Violation | str, source: str | None = None):
        if isinstance(violations, str):
            violations = [Violation((), "", violations)]
        elif isinstance(violations, Violation):
            violations = [violations]
        self.violations: tuple[Violation, ...] = tuple(violations)
        self.source = source
        head = f"{source}: " if source else ""
        n = len(self.violations)
        lines = [f"{head}{n} problem{'s' if n != 1 else ''} found in the dataset:"]
        lines += [f"  - {v}" for v in self.violations]
        super().__init__("\n".join(lines))


class DatasetWarning(UserWarning):
    """Something in the dataset is unusual but usable (e.g. a text column that is ignored)."""


class ModelError(HybridPKError, ValueError):
    """A model specification or parameter set is invalid (unknown model, missing parameter, ...)."""


class SolverError(HybridPKError, RuntimeError):
    """The ODE solve failed for one or more subjects; ``subjects`` names them with the reason."""

    def __init__(self, message: str, subjects: dict | None = None):
        self.subjects = dict(subjects or {})
        super().__init__(message)


class Interrupted(KeyboardInterrupt):
    """A fit or training stopped by Ctrl-C (SIGINT); the message says what was finished and which checkpoint
    holds the work done, so that ``--resume`` can continue from it. A KeyboardInterrupt, so that code that
    stops on Ctrl-C still stops."""
