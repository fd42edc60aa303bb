"""kvd-run-teacher: the model source `kvd_run`, a finished kvd run's student as a model."""

from kvd_run_teacher.source import KvdRunSource

__all__ = ["KvdRunSource"]
