"""``python -m consumer ...`` is ``objstream consumer ...``."""

import sys

from common.cli import run

run(["consumer", *sys.argv[1:]], sides=["consumer"])
