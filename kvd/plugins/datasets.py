"""Built-in datasets, registered through the same hook as a third-party plugin's."""

from __future__ import annotations

from kvd.core.hookspecs import Register, hookimpl
from kvd.data.files import TextFilesSource
from kvd.data.stdlib import StdlibSource


@hookimpl
def register_datasets(register: Register) -> None:
    register("stdlib", StdlibSource)
    register("text_files", TextFilesSource)
