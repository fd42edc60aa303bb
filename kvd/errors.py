"""Public import path of `kvd.core.errors` (plugins and docs import it from here); kvd's own
modules import `kvd.core.errors`."""

from kvd.core.errors import *  # noqa: F403
