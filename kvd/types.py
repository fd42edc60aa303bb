"""Public import path of `kvd.core.types` (plugins and docs import it from here); kvd's own
modules import `kvd.core.types`."""

from kvd.core.types import *  # noqa: F403
