"""Names that become file or folder names (run names, teacher ids, eval result names): a name is
never a path, so it cannot lead a write outside the folder it is meant for."""

from __future__ import annotations


def name_problem(name: str) -> str | None:
    """Why `name` cannot serve as one file or folder name, or None when it can."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains a path separator (a name, not a path)"
    if set(name) == {"."}:
        return "is only dots"
    if any(ord(c) < 32 for c in name):
        return "contains a control character"
    return None


def checked_name(name: str) -> str:
    """`name` itself, or a ValueError (for pydantic validators) saying what is wrong."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{name!r} {problem}: use letters, digits, '-', '_' and '.'")
    return name
