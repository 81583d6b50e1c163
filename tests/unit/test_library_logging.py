"""objstream as a library: its log records stay out of an application's stderr unless the
application configures logging."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
from objstream.consumer import Receiver  # noqa: F401  (what an application imports)
from objstream.producer import FileStreamer  # noqa: F401
logging.getLogger("objstream.consumer.stream_table").warning("a library warning")
{configure}
logging.getLogger("objstream.producer.sender").warning("after configuring")
"""


def _stderr(configure: str) -> str:
    code = SCRIPT.format(configure=configure)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stderr


def test_an_application_that_configures_nothing_sees_nothing() -> None:
    assert _stderr("") == ""


def test_an_application_that_configures_logging_sees_the_warnings() -> None:
    err = _stderr("logging.basicConfig()")
    assert "a library warning" not in err  # before the application configured anything
    assert "WARNING:objstream.producer.sender:after configuring" in err
