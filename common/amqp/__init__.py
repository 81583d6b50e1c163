"""The one AMQP adapter: every broker call of objstream goes through here, and only here is pika.

Like dramatiq's ``brokers/rabbitmq.py``: the rest of objstream sees :class:`Connection`,
:class:`Channel`, :class:`~objstream.common.protocol.Properties` and :class:`Delivery`, and
objstream's own errors. pika's exceptions are translated where they happen:

- :class:`~objstream.common.errors.ConnectionLost`: the connection went away (broker restart,
  node death, closed by an operator, a close noticed on the next call). Workers reconnect.
- :class:`~objstream.common.errors.BrokerRefused`: the broker closed a channel over an
  operation (PRECONDITION_FAILED, ACCESS_REFUSED, NOT_FOUND...), with its own words.
- :class:`~objstream.common.errors.BrokerUnreachable` /
  :class:`~objstream.common.errors.AuthenticationRefused` when connecting.

No delivery can stop a worker: header tables are decoded within bounds
(:mod:`objstream.common.headers`), and every consumer callback runs under a guard that rejects
(dead-letters) what it cannot handle (:meth:`Channel.consume`).

One connection per thread (pika is not thread-safe); the one call another thread may make is
:meth:`Connection.call_threadsafe`. Three modules: :mod:`.connection` (channels, deliveries, the
connection a process uses), :mod:`.connect` (getting one) and :mod:`.framing` (pika's framing
with fewer copies of the payload, which every connection gets).
"""

import logging

from objstream.common.amqp.connect import (
    broker_parameters,
    connect,
    connect_failure,
    connected_url,
    reestablish,
)
from objstream.common.amqp.connection import (
    Channel,
    Closing,
    Connection,
    Delivery,
    OnMessage,
    describe,
    guarded,
)

__all__ = [
    "Channel",
    "Closing",
    "Connection",
    "Delivery",
    "OnMessage",
    "broker_parameters",
    "connect",
    "connect_failure",
    "connected_url",
    "describe",
    "guarded",
    "reestablish",
]

# A library stays silent unless its application configures logging: without a handler of
# its own, objstream's warnings would reach stderr through logging's last resort. Here, since
# every part of objstream that talks to a broker imports this module (and pika imports logging
# anyway), while `objstream --version` does not pay for logging.
logging.getLogger("objstream").addHandler(logging.NullHandler())
