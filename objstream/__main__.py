"""``python -m objstream ...`` is the ``objstream`` command."""

from objstream.common.cli import main

raise SystemExit(main())
