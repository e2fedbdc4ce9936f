"""One exit-code mechanism: each error type carries its BIDS Apps code (:mod:`hsf_bids.errors`)."""

from __future__ import annotations

import pytest

from hsf_bids import errors
from hsf_bids.bids import BIDSQueryError
from hsf_bids.engines import EngineError, ModelLoadError
from hsf_bids.engines.contract import ModelContractError
from hsf_bids.group.tables import GroupInputError
from hsf_bids.hub import (
    ChecksumError,
    DownloadError,
    HubError,
    HubNotFoundError,
    ModelsMissingError,
    UnknownPresetError,
)
from hsf_bids.image import InvalidImageError
from hsf_bids.outputs import (
    DerivativesError,
    LutConflictError,
    OutputWriteError,
    UnsafeOutputError,
)
from hsf_bids.quantize import QuantizeUnavailableError
from hsf_bids.runtime import RuntimeEnvironmentError
from hsf_bids.templates import TemplateError

# The codes the commands have always ended with; changing one breaks users' scripts.
CODES = {
    BIDSQueryError: 18,
    errors.UsageError: 64,
    UnknownPresetError: 64,
    EngineError: 64,
    ModelLoadError: 64,
    QuantizeUnavailableError: 64,
    HubError: 65,
    ModelContractError: 65,
    ChecksumError: 65,
    InvalidImageError: 65,
    HubNotFoundError: 66,
    ModelsMissingError: 66,
    TemplateError: 66,
    GroupInputError: 66,
    DerivativesError: 73,
    OutputWriteError: 73,
    LutConflictError: 73,
    UnsafeOutputError: 73,
    RuntimeEnvironmentError: 73,
    DownloadError: 74,
}


@pytest.mark.parametrize("kind", list(CODES), ids=lambda k: k.__name__)
def test_each_error_carries_its_code(kind):
    assert issubclass(kind, errors.HsfBidsError)
    assert kind.exit_code == CODES[kind]


def test_an_instance_may_carry_another_code():
    exc = BIDSQueryError("bad filter file", exit_code=errors.EX_USAGE)
    assert str(exc) == "bad filter file" and errors.exit_code(exc) == 64
    assert isinstance(exc, ValueError)  # callers that catch ValueError still do
    assert errors.exit_code(BIDSQueryError("nothing to segment")) == 18


def test_foreign_errors():
    assert errors.exit_code(FileNotFoundError(2, "No such file")) == errors.EX_IOERR
    assert errors.exit_code(KeyboardInterrupt()) == 130
    assert errors.exit_code(ValueError("x")) == errors.EX_FAILURE
    assert errors.exit_code(ValueError("x"), default=errors.EX_USAGE) == 64


def test_codes_are_declared_once():
    values = [getattr(errors, name) for name in errors.__all__ if name.startswith("EX_")]
    assert len(values) == len(set(values))
    assert (errors.EX_OK, errors.EX_BIDS_INVALID, errors.EX_UNKNOWN_LEVEL) == (0, 16, 17)
