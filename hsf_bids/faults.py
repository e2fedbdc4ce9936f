"""A testing hook: stop the process at a named point of a run (``HSF_BIDS_FAULT_AT``).

With ``HSF_BIDS_FAULT_AT=<point>`` in its environment, a process that reaches ``<point>`` prints
``hsf-bids: HSF_BIDS_FAULT_AT: stopped at <point> (pid <pid>)`` on stderr and stops itself
(``SIGSTOP``). Whoever set the variable then does what the test is about: ``kill -9`` the process
group (a crash at that exact point), lower its file-size limit and continue it (``prlimit`` then
``SIGCONT``: a full disk from that point on), or send it ``SIGTERM``. Nothing else changes: the
hook neither mocks nor skips any work, and unset it costs one dictionary look-up.

Points (``tests/test_fault_injection.py`` uses them):

- ``registration``: the template registration has run, its temporary folder still exists;
- ``segment:right``, ``segment:left``: a side's inference is done, its crop not yet written;
- ``paste_back``: both sides are assembled, the bilateral images not yet written;
- ``write:<file name>``: any atomic write (:mod:`hsf_bids.atomic`) of a file of that name, its
  temporary file created (empty), not yet written (``write:sub-01.html``,
  ``write:sub-01_space-T1w_desc-subfields_dseg.nii.gz``, ...).

Not for production use: a stopped process waits for a signal forever.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["FAULT_ENV", "fault_point"]

FAULT_ENV = "HSF_BIDS_FAULT_AT"


def fault_point(name: str) -> None:
    """Stop here when ``HSF_BIDS_FAULT_AT`` names this point (see the module's docstring)."""
    if os.environ.get(FAULT_ENV) != name:
        return
    sys.stderr.write(f"hsf-bids: {FAULT_ENV}: stopped at {name} (pid {os.getpid()})\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSTOP)
