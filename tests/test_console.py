"""One message channel: :mod:`logging`, shown on stderr by ``setup_console``."""

from __future__ import annotations

import logging

import pytest

from hsf_bids.cli.messages import setup_console, verbosity_level


@pytest.fixture
def console():
    root = logging.getLogger()
    level = root.level
    handler = setup_console("hsf-bids")
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def test_package_messages_read_as_before(console, capsys):
    log = logging.getLogger("hsf_bids.cli.participant")
    log.info("finished %s; outputs in %s", "sub-01", "/out")
    log.warning("BIDS validation skipped: %s", "no deno")
    log.error("the input dataset %s is not valid BIDS:\n  %s", "/ds", "NOT_INCLUDED")
    log.debug("not shown by default")
    assert capsys.readouterr().err == (
        "hsf-bids: finished sub-01; outputs in /out\n"
        "hsf-bids: warning: BIDS validation skipped: no deno\n"
        "hsf-bids: error: the input dataset /ds is not valid BIDS:\n  NOT_INCLUDED\n"
    )


def test_verbose_shows_debug_and_libraries_keep_their_form(console, capsys):
    setup_console("hsf-bids-models", verbosity_level(1))
    logging.getLogger("hsf_bids.engines.plan").debug("measured %d", 3)
    logging.getLogger("somelib").info("hello")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "hsf-bids-models: debug: measured 3"
    assert err[1].endswith(" somelib INFO: hello")


def test_setting_up_again_replaces_the_handler(console, capsys):
    setup_console("hsf-bids")
    logging.getLogger("hsf_bids").warning("once")
    assert capsys.readouterr().err == "hsf-bids: warning: once\n"
