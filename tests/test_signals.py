"""SIGTERM stops a run at once (:mod:`hsf_bids.cli.signals`), even while its main thread is busy
in native code, where a Python signal handler would wait for the call to return."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hsf_bids.errors import EX_TERMINATED

# A long call into native code that releases the GIL and does not return on a signal, as an
# ONNX Runtime forward pass and ANTs (through ctypes) do: PBKDF2 with 10**9 rounds runs for
# minutes. A forked worker is busy the same way.
BUSY = """
import hashlib, multiprocessing
from hsf_bids.cli.signals import stop_on_sigterm
def busy():
    hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 10**9)
stop_on_sigterm(cleanup=lambda: print("cleaned up", flush=True))
worker = multiprocessing.get_context("fork").Process(target=busy)
worker.start()
print(worker.pid, flush=True)
busy()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_sigterm_stops_a_process_busy_in_native_code_and_its_workers():
    proc = subprocess.Popen(
        [sys.executable, "-c", BUSY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    worker = int(proc.stdout.readline())
    time.sleep(0.5)  # well inside sum()
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - start

    assert proc.returncode == EX_TERMINATED, err
    assert elapsed < 2, elapsed
    assert "stopped by SIGTERM" in err and "resumes" in err
    assert "cleaned up" in out
    deadline = time.monotonic() + 5
    while _alive(worker):
        assert time.monotonic() < deadline, "the worker outlived the run"
        time.sleep(0.05)


def test_a_worker_given_sigterm_ends_and_stops_the_run():
    """A forked worker inherits the handler but not the watcher thread: it ends as SIGTERM's
    default would, and its signal reaches the main process's watcher through the shared pipe."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BUSY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    worker = int(proc.stdout.readline())
    time.sleep(0.5)
    os.kill(worker, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EX_TERMINATED, err
    assert "stopped by SIGTERM" in err
