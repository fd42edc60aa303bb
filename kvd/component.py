"""Public import path of `kvd.core.component` (plugins and docs import it from here); kvd's own
modules import `kvd.core.component`."""

from kvd.core.component import *  # noqa: F403
