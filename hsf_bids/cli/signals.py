"""Stopping on ``SIGTERM``: what schedulers send at a time limit, before ``SIGKILL``.

SLURM sends ``SIGTERM`` to every process of a job step when its time is up and ``SIGKILL`` after
``KillWait`` (30 s by default); ``docker stop`` and Kubernetes do the same. The run then has a few
seconds, and its main thread is usually inside native code (an ANTs registration, a forward pass)
where a Python signal handler would only run once that call returns, possibly minutes later.

So the handler does not run in the main thread: the signal's number is written to a pipe
(:func:`signal.set_wakeup_fd`, done by the C-level handler the moment the signal arrives), and a
watcher thread reading that pipe stops the run at once: one line on stderr, the worker processes
killed, the private temporary folder removed, exit :data:`~hsf_bids.errors.EX_TERMINATED` (143,
128 + 15, as shells report it). Nothing is lost: every output is written atomically
(:mod:`hsf_bids.atomic`), so a file is either whole or not there, and the work folder keeps every
finished step, so the same command resumes where the run stopped.

The watcher needs the GIL for a moment: native code that releases it (ONNX Runtime, ANTs through
ctypes, large NumPy operations) does not delay the stop; a call that holds it does, until it
returns (``SIGKILL`` still ends the run where it is, and the rerun resumes as after a kill).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable

from hsf_bids.errors import EX_TERMINATED

__all__ = ["stop_on_sigterm"]

LOGGER = logging.getLogger(__name__)
_main_pid: int | None = None


def _handler(signum: int, frame: object) -> None:
    # The watcher thread of the main process acts on it; a worker forked from the main process
    # inherits this handler but not the thread, so it ends as the signal's default would.
    if os.getpid() != _main_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _stop(signum: int, cleanup: Callable[[], None]) -> None:
    LOGGER.error(
        "stopped by %s (a scheduler's time limit?): outputs written so far are complete; the "
        "same command resumes from the work folder's finished steps",
        signal.Signals(signum).name,
    )
    for child in multiprocessing.active_children():
        child.kill()
    cleanup()
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EX_TERMINATED)  # no interpreter shutdown: it would wait for the busy threads


def stop_on_sigterm(cleanup: Callable[[], None] = lambda: None) -> None:
    """From now on, ``SIGTERM`` stops the process within a second, whatever its main thread is
    doing (see the module's docstring); ``cleanup`` runs first (remove temporary folders).
    Call it once, from the main thread, before any worker process is started."""
    global _main_pid
    _main_pid = os.getpid()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _handler)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            # Other signals with a Python handler (SIGINT) are written here too.
            if signal.SIGTERM in data and os.getpid() == _main_pid:
                _stop(signal.SIGTERM, cleanup)

    threading.Thread(target=watch, name="hsf_bids-sigterm", daemon=True).start()
