"""``python -m producer ...`` is ``objstream producer ...``."""

import sys

from common.cli import run

run(["producer", *sys.argv[1:]], sides=["producer"])
