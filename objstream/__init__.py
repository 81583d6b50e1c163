"""objstream: memory-flat, verified, resumable streaming of large objects over RabbitMQ.

Everything installs under this one name: ``objstream.common`` (settings, wire protocol, sessions,
the AMQP adapter), ``objstream.producer`` (the sending and serving side),
``objstream.consumer`` (the receiving and requesting side) and ``objstream.jobs`` (the example
jobs). In the source tree these are the top-level folders ``common/``, ``producer/``,
``consumer/`` and ``jobs/``; ``pyproject.toml`` maps them under ``objstream`` (and the links in
this folder do the same for a checkout used without installing).
"""

__version__ = "0.1.0"
"""The one place the version is written: ``pyproject.toml`` reads it from here. A literal, not
``importlib.metadata.version()``, which costs more than the rest of ``objstream --version``."""
