"""Public import path of `kvd.spec.geometry` (plugins and docs import it from here); kvd's own
modules import `kvd.spec.geometry`."""

from kvd.spec.geometry import *  # noqa: F403
