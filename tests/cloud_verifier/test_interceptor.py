"""Each core exception becomes its status code with a one-line message; anything else is INTERNAL."""

import grpc
import pytest

from cloud_verifier.errors import CapacityError, ProposalError, SessionFinishedError, SessionNotFoundError
from cloud_verifier.interceptor import status_for
from shared.decoding import DecodingConfigError
from shared.vocab import VocabError
from shared.wire import WireFormatError


@pytest.mark.parametrize("error, code", [
    (ProposalError("bad draft\nsecond line"), grpc.StatusCode.INVALID_ARGUMENT),
    (WireFormatError("bad message"), grpc.StatusCode.INVALID_ARGUMENT),
    (DecodingConfigError("bad temperature"), grpc.StatusCode.INVALID_ARGUMENT),
    (VocabError("bad id"), grpc.StatusCode.INVALID_ARGUMENT),
    (CapacityError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SessionNotFoundError("no such session"), grpc.StatusCode.NOT_FOUND),
    (SessionFinishedError("finished"), grpc.StatusCode.FAILED_PRECONDITION),
])
def test_core_errors_map_to_their_status(error: Exception, code: grpc.StatusCode) -> None:
    assert status_for(error) == (code, str(error).splitlines()[0])


def test_other_errors_are_internal_and_one_line() -> None:
    assert status_for(RuntimeError("kaboom\ntraceback")) == (grpc.StatusCode.INTERNAL, "internal error: RuntimeError: kaboom")
    assert status_for(KeyError()) == (grpc.StatusCode.INTERNAL, "internal error: KeyError: KeyError")
