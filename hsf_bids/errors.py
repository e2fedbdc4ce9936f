"""Exit codes, and the one way an error carries the code a command ends with.

The codes are those of the BIDS Apps execution specification (draft), which takes the
``sysexits.h`` codes for usage and input problems. Every error a user can cause is a
:class:`HsfBidsError` subclass whose class attribute ``exit_code`` is its code (an instance may
carry another one, as :class:`hsf_bids.bids.BIDSQueryError` does for an empty selection); the
commands (``hsf-bids``, ``hsf-bids-models`` and the group level) turn an error into its code with
:func:`exit_code`, never with a table of their own.

This module imports nothing from the package, so every module can import it.
"""

from __future__ import annotations

import reprlib

__all__ = [
    "EX_BIDS_INVALID",
    "EX_CANTCREAT",
    "EX_DATAERR",
    "EX_EMPTY_SELECTION",
    "EX_FAILURE",
    "EX_INTERRUPTED",
    "EX_IOERR",
    "EX_NOINPUT",
    "EX_OK",
    "EX_TERMINATED",
    "EX_UNKNOWN_LEVEL",
    "EX_USAGE",
    "HsfBidsError",
    "UsageError",
    "brief",
    "exit_code",
]

EX_OK = 0
EX_FAILURE = 1  # a subject's workflow failed (its crash file says why); a checksum mismatch
EX_BIDS_INVALID = 16  # the input is not valid BIDS
EX_UNKNOWN_LEVEL = 17  # an analysis level other than participant or group
EX_EMPTY_SELECTION = 18  # the labels, sessions or filters select no image
EX_USAGE = 64  # a bad option or combination of options
EX_DATAERR = 65  # an input file (image, hub file, model file) is invalid
EX_NOINPUT = 66  # an input file or folder is missing
EX_CANTCREAT = 73  # an output, work or temporary folder or file cannot be written
EX_IOERR = 74  # a network or other I/O error
EX_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EX_TERMINATED = 143  # stopped by SIGTERM (128 + 15): a scheduler's time limit; a rerun resumes


class HsfBidsError(Exception):
    """An error the user can cause and fix: the command prints its message and ends with
    ``exit_code``, without a traceback.

    Subclasses set the class attribute ``exit_code``; ``exit_code=`` given to the constructor
    overrides it for one instance.
    """

    exit_code: int = EX_FAILURE

    def __init__(self, *args: object, exit_code: int | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(HsfBidsError):
    """A problem with the command line or the environment it names (64, or the ``exit_code=``
    given: a missing input folder, an output folder that cannot be created)."""

    exit_code = EX_USAGE


def exit_code(exc: BaseException, default: int = EX_FAILURE) -> int:
    """The code a command ends with after ``exc``.

    An :class:`HsfBidsError` carries its own; an :class:`OSError` is an I/O error and a
    :class:`KeyboardInterrupt` an interruption; anything else gets ``default`` (the caller knows
    what a foreign error means where it caught it, e.g. a ``ValueError`` from parsing options).
    """
    if isinstance(exc, HsfBidsError):
        return exc.exit_code
    if isinstance(exc, OSError):
        return EX_IOERR
    if isinstance(exc, KeyboardInterrupt):
        return EX_INTERRUPTED
    return default


# A value quoted in a message is cut to this many characters: a hub file may hold a 5 MB string,
# and a YAML structure may stand for billions of elements if written out whole.
BRIEF_CHARS = 80


def _brief_repr(limit: int) -> reprlib.Repr:
    # Bounded at every level, so the cost never depends on the value's size.
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxtuple, shown.maxlist, shown.maxdict = 2, 4, 4, 4
    shown.maxset = shown.maxfrozenset = shown.maxdeque = shown.maxarray = 4
    shown.maxstring = shown.maxother = shown.maxlong = limit
    return shown


def brief(value: object, *, limit: int = BRIEF_CHARS, quote: bool = True) -> str:
    """``value`` as an error message quotes it: its ``repr`` (a string without quotes when
    ``quote`` is false), at most about ``limit`` characters, a long string's length said.

    Every message that shows a value the user wrote goes through here, so no input can make an
    error message (or the time and memory to build it) large.
    """
    if isinstance(value, str) and not quote:
        text = value if len(value) <= limit else value[: limit - 3] + "..."
    else:
        text = _brief_repr(limit).repr(value)
        if len(text) > limit:
            text = text[: limit - 3] + "..."
    if isinstance(value, (str, bytes)) and len(value) > limit:
        text += f" ({len(value)} characters)"
    return text
