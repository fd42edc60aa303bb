"""Public import path of `kvd.core.hookspecs` (plugins and docs import it from here); kvd's own
modules import `kvd.core.hookspecs`."""

from kvd.core.hookspecs import *  # noqa: F403
