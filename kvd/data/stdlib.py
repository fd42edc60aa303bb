"""The built-in corpus: English text shipped with Python itself, nothing to download.

`pydoc_data.topics` (the language reference behind `help()`, task "reference") and the
docstrings of a fixed allowlist of standard-library modules (tasks "module_doc", "class_doc",
"function_doc", "method_doc"). The allowlist holds cross-platform modules that import without
side effects (no GUI, no printing, no processes, no deprecation warnings); members are taken only
from the module that defines them, in sorted order, so the corpus is the same on every machine
with the same Python version. Identical docstrings are kept once.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal

from pydantic import Field

from kvd.core.component import ComponentConfig
from kvd.data.base import Document, TextSource

Task = Literal["reference", "module_doc", "class_doc", "function_doc", "method_doc"]

MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.events",
    "asyncio.exceptions", "asyncio.futures", "asyncio.locks", "asyncio.protocols",
    "asyncio.queues", "asyncio.runners", "asyncio.staggered", "asyncio.streams",
    "asyncio.subprocess", "asyncio.taskgroups", "asyncio.tasks", "asyncio.timeouts",
    "asyncio.transports", "base64", "bdb", "binascii", "bisect", "builtins", "bz2", "cProfile",
    "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections", "collections.abc",
    "colorsys", "compileall", "concurrent.futures._base", "concurrent.futures.process",
    "concurrent.futures.thread", "configparser", "contextlib", "contextvars", "copy", "copyreg",
    "csv", "dataclasses", "datetime", "dbm.dumb", "decimal", "difflib", "dis", "doctest",
    "email.base64mime", "email.charset", "email.contentmanager", "email.errors",
    "email.feedparser", "email.generator", "email.header", "email.headerregistry", "email.message",
    "email.mime.multipart", "email.mime.text", "email.parser", "email.policy", "email.quoprimime",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "gc", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac",
    "html", "html.parser", "http", "http.client", "http.cookiejar", "http.cookies", "http.server",
    "imaplib", "importlib", "importlib.abc", "importlib.machinery", "importlib.metadata",
    "importlib.resources.abc", "importlib.util", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "keyword", "linecache", "logging", "logging.config",
    "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes", "modulefinder", "netrc",
    "ntpath", "numbers", "operator", "optparse", "pathlib", "pdb", "pickle", "pickletools",
    "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats",
    "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib", "runpy",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socketserver",
    "stat", "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "tomllib",
    "trace", "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest.case",
    "unittest.loader", "unittest.mock", "unittest.result", "unittest.runner", "unittest.suite",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser", "uuid", "warnings",
    "wave", "weakref", "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server",
    "wsgiref.util", "wsgiref.validate", "xml.dom.domreg", "xml.dom.minidom", "xml.dom.pulldom",
    "xml.etree.ElementTree", "xml.sax", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)  # fmt: skip
"""Modules whose docstrings form the corpus (sorted; a module that fails to import is skipped)."""


class StdlibSource(TextSource):
    """English text from the Python standard library: `pydoc_data.topics` and docstrings."""

    class Config(ComponentConfig):
        min_chars: int = Field(200, ge=1)
        """Docstrings (and reference topics) shorter than this, after dedenting, are dropped."""
        tasks: list[Task] | None = None
        """Keep only these tasks (default: all)."""

    config: Config

    def documents(self) -> Iterator[Document]:
        seen: set[str] = set()
        for doc in self._all_documents():
            if len(doc.text) < self.config.min_chars or doc.text in seen:
                continue
            seen.add(doc.text)  # before the task filter: a restricted corpus is a subset
            if self.config.tasks is None or doc.task in self.config.tasks:
                yield doc

    def _all_documents(self) -> Iterator[Document]:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield Document(topics[key].strip(), "reference", f"reference:{key}")
        for name in MODULES:
            yield from _documents_of(name)


def _documents_of(name: str) -> list[Document]:
    """Docstrings of one module, none if it does not import; deprecation warnings muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except Exception:  # not built on this platform: skipped, like a missing module
            return []
        return list(_module_documents(module))


def _module_documents(module: ModuleType) -> Iterator[Document]:
    name = module.__name__
    yield from _doc(module, "module_doc", name)
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            yield from _doc(obj, "class_doc", f"{name}.{attr}")
            for member, value in sorted(vars(obj).items()):
                value = getattr(value, "__func__", value)  # classmethod, staticmethod
                if not member.startswith("_") and _is_own_member(value, name):
                    yield from _doc(value, "method_doc", f"{name}.{attr}.{member}")
        elif inspect.isroutine(obj):
            yield from _doc(obj, "function_doc", f"{name}.{attr}")


def _is_own_member(value: Any, module: str) -> bool:
    """A method or property written in `module` (not one another package patched in)."""
    if not (inspect.isroutine(value) or inspect.isdatadescriptor(value)):
        return False
    return getattr(getattr(value, "fget", value), "__module__", None) in (None, module)


def _doc(obj: Any, task: str, qualname: str) -> Iterator[Document]:
    raw = getattr(obj, "__doc__", None)
    if isinstance(raw, str) and raw.strip():
        yield Document(inspect.cleandoc(raw), task, f"{task}:{qualname}")
