"""Public import path of `kvd.spec.models` (plugins and docs import it from here); kvd's own
modules import `kvd.spec.models`."""

from kvd.spec.models import *  # noqa: F403
