"""How the AMQP adapter words pika's failures (``_translated``): a failure of pika's own on a
connection it has closed is a lost connection (the caller reconnects), never a crash of the
caller's thread; the same failure on an open connection is a bug and is raised as it is."""

from __future__ import annotations

import pytest

from objstream.common.amqp.connection import _translated
from objstream.common.errors import ConnectionLost

URL = "amqp://guest:***@127.0.0.1:5672/%2F"


@pytest.mark.parametrize(
    "error", [ValueError("Timeout closed before call"), AttributeError("'NoneType' has no 'poll'")]
)
def test_pikas_own_failure_on_a_closed_connection_is_connection_lost(error: Exception) -> None:
    with (
        pytest.raises(ConnectionLost, match=str(error).split()[0]),
        _translated(URL, lambda: False, "processing events"),
    ):
        raise error


def test_the_same_failure_on_an_open_connection_is_raised_as_it_is() -> None:
    with (
        pytest.raises(ValueError, match="Timeout closed"),
        _translated(URL, lambda: True, "processing events"),
    ):
        raise ValueError("Timeout closed before call")
