"""``python -m objstream.consumer ...`` is ``objstream consumer ...``."""

import sys

from objstream.common.cli import run

run(["consumer", *sys.argv[1:]], sides=["consumer"])
