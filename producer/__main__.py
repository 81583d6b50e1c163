"""``python -m objstream.producer ...`` is ``objstream producer ...``."""

import sys

from objstream.common.cli import run

run(["producer", *sys.argv[1:]], sides=["producer"])
