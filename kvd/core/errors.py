"""Errors a user can fix. The CLI prints them (no traceback) and exits with their exit code."""

from __future__ import annotations

from dataclasses import dataclass


class KvdError(Exception):
    """A problem with the user's input or plan; `exit_code` 2 = bad input, 1 = unsound plan."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Problem:
    """One validation problem: a dotted location (`teachers.1.path`) and what is wrong there."""

    loc: str
    message: str


class SpecError(KvdError):
    """Several problems found at once in a run spec; rendered as one table."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s) in the run spec")
        self.source = source
        self.problems = problems


class UnknownComponentError(KvdError):
    """A spec or command names a component no installed plugin registers."""


class DuplicateComponentError(KvdError):
    """Two plugins register the same component name in one kind."""


class PlanError(KvdError):
    """The inputs are valid but the teacher/student plan cannot work (exit 1)."""

    exit_code = 1
