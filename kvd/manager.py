"""Public import path of `kvd.core.manager` (plugins and docs import it from here); kvd's own
modules import `kvd.core.manager`."""

from kvd.core.manager import *  # noqa: F403
