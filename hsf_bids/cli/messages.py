"""The console: what the commands tell their user, through :mod:`logging` (NiPreps style).

Every module logs to its own ``logging.getLogger(__name__)``, all under ``hsf_bids``; nothing in the
package prints messages or warns with :mod:`warnings` for the user. A command calls
:func:`setup_console` once: one handler on the root logger writes the package's records to
standard error as the user reads them, ``<prog>: message`` for information and
``<prog>: warning: message`` / ``<prog>: error: message`` above it. Records of other libraries keep
the time-stamped form (``<time> <logger> <LEVEL>: message``). Tracebacks of failed steps are in
the Nipype crash files (``sub-<label>/log/<run-id>/crash-*.txt``), never on the console.

The handler writes to the ``sys.stderr`` of the moment, so output captured by a caller (pytest's
``capsys``) is captured; calling :func:`setup_console` again replaces it.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

__all__ = [
    "PACKAGE_LOGGER",
    "ConsoleFormatter",
    "adopt_nipype_logging",
    "setup_console",
    "verbosity_level",
]

PACKAGE_LOGGER = "hsf_bids"
_LIBRARY_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
_TRACEBACK = "Traceback (most recent call last)"


def _is_package(name: str) -> bool:
    return name == PACKAGE_LOGGER or name.startswith(PACKAGE_LOGGER + ".")


class ConsoleFormatter(logging.Formatter):
    """``<prog>: [warning: |error: |debug: ]message`` for the package's records; the
    time-stamped library form for the others."""

    def __init__(self, prog: str) -> None:
        super().__init__(_LIBRARY_FORMAT)
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        if not _is_package(record.name):
            return _without_traceback(super().format(record))
        if record.levelno >= logging.ERROR:
            prefix = "error: "
        elif record.levelno >= logging.WARNING:
            prefix = "warning: "
        elif record.levelno >= logging.INFO:
            prefix = ""
        else:
            prefix = "debug: "
        text = f"{self.prog}: {prefix}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _without_traceback(text: str) -> str:
    # Nipype logs a failed node's whole traceback in the message of its error record; the crash
    # file the same record names keeps it, the console keeps the lines before it.
    cut = text.find(_TRACEBACK)
    if cut < 0:
        return text
    return text[:cut].rstrip() + " (traceback in the crash file)"


class _ConsoleHandler(logging.StreamHandler):
    """A stream handler bound to whatever ``sys.stderr`` is when a record is written."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:  # StreamHandler.__init__ and setStream assign it
        pass


def verbosity_level(verbosity: int) -> int:
    """The logging level of ``-v`` counts: information by default, debugging with ``-v``."""
    return logging.DEBUG if verbosity > 0 else logging.INFO


def setup_console(prog: str, level: int = logging.INFO) -> logging.Handler:
    """Send log records of ``level`` and above to standard error, as ``prog`` speaking.

    Sets the root logger's level (as :func:`logging.basicConfig` would) and replaces the console
    handler a previous call installed; returns the handler.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    handler = _ConsoleHandler()
    handler.setFormatter(ConsoleFormatter(prog))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def adopt_nipype_logging() -> None:
    """Let Nipype's records reach the user through the console handler only.

    Nipype gives its ``nipype`` logger a handler of its own on standard output, so its records
    were printed twice, a failed node's whole traceback included. They propagate to the root
    logger, where :func:`setup_console`'s handler writes them with the traceback cut (the crash
    file the record names keeps it).
    Call it after Nipype's logging is configured (``nipype.logging.update_logging``).
    """
    logger = logging.getLogger("nipype")
    for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
        logger.removeHandler(handler)
