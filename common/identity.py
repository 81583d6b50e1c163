"""Who a message comes from, as far as the broker vouches for it.

A message *claims* a site: the ``sender`` of an offer, the ``requester`` of a request, the
``site`` of a ``progress`` or ``done``. Claims are free text. What the broker vouches for is:

- the validated ``user_id``: RabbitMQ refuses a publish whose ``user_id`` is not the user the
  connection logged in as;
- the routing key of an answer, ``reply:S:QID:PEER``: under least privilege (``objstream admin
  permissions``) a site's user may publish only keys that end in its own name.

Each site has a broker user: the one ``OBJSTREAM_SITE_USERS`` names for it (``site=user,...``),
by default the user named like the site. Deployments in which several sites share one user (the
default ``guest``, or one application user for all) name it in ``OBJSTREAM_SHARED_USERS``
(default ``guest``): a shared user speaks for any site, since the broker cannot tell its sites
apart. A message counts as site S's only when its user speaks for S and, for answers, its key
names S (:meth:`Identities.check_answer`). Anything else is forged.

Regions (brokers joined by federation, which keeps ``user_id`` across its links): a broker
trusts the others to have checked ``user_id``, so the administrator of one regional broker
could make a user named like another region's site and speak for it. ``OBJSTREAM_SITE_LINKS``
(``site=URI,...``) closes that: a message claiming a site named there counts only if it came
by that federation link (``Envelope.via``), and one claiming any other site only if it was
published on this broker. Empty (the default): no such check.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from objstream.common.errors import ProtocolError
from objstream.common.settings import Settings

# reply:SITE:QID:PEER, the key of an answer (site names never hold ":")
_ANSWER_KEY = re.compile(r"reply:([^:]+):([0-9a-f]{32}):([^:]+)")


class Forged(ProtocolError):
    """A message that claims a site the broker does not vouch it came from (dead-lettered)."""


def answer_publisher(routing_key: str) -> str | None:
    """The publisher an answer's key names (``reply:S:QID:PEER`` -> ``PEER``), or None if the
    key is not an answer's."""
    match = _ANSWER_KEY.fullmatch(routing_key)
    return None if match is None else match.group(3)


@dataclass(frozen=True)
class Identities:
    """The mapping of sites to broker users, and the users several sites share."""

    site_users: Mapping[str, str] = field(default_factory=dict)
    shared_users: frozenset[str] = frozenset({"guest"})
    site_links: Mapping[str, str] = field(default_factory=dict)
    """The federation link each remote site's messages come by (empty: not checked)."""

    @classmethod
    def of(
        cls,
        site_users: Mapping[str, str] | None = None,
        shared_users: Iterable[str] = ("guest",),
        site_links: Mapping[str, str] | None = None,
    ) -> Identities:
        return cls(dict(site_users or {}), frozenset(shared_users), dict(site_links or {}))

    @classmethod
    def from_settings(cls, settings: Settings) -> Identities:
        return cls.of(settings.site_users, settings.shared_users, settings.site_links)

    def user_of(self, site: str) -> str:
        """The broker user of ``site`` (its own name unless mapped)."""
        return self.site_users.get(site, site)

    def speaks_for(self, user: str | None, site: str) -> bool:
        """May a message published by broker user ``user`` claim ``site``?"""
        if not user:
            return False
        return user in self.shared_users or user == self.user_of(site)

    def principal(self, user: str | None, site: str) -> str:
        """Whom a share of slots is counted for: the broker user, or, for a user several sites
        share, the site it claims (the broker cannot tell those sites apart; the share is as
        fair as they are honest)."""
        if user in self.shared_users or not user:
            return f"{site} (as {user})"
        return user

    def check_claim(self, what: str, site: str, user: str | None, via: str | None = None) -> None:
        """Check that broker user ``user`` may claim ``site`` in ``what`` (an offer, a request),
        coming by federation link ``via`` (None: published on this broker).

        Raises:
            Forged: it may not (the text names both and says where the mapping is set).
        """
        if not self.speaks_for(user, site):
            raise Forged(
                f"{what} claims site {site!r} but was published by broker user {user!r}, and "
                f"the user of site {site!r} is {self.user_of(site)!r} (OBJSTREAM_SITE_USERS; "
                "a user several sites share goes in OBJSTREAM_SHARED_USERS)"
            )
        self.check_link(what, site, via)

    def check_link(self, what: str, site: str, via: str | None) -> None:
        """With ``site_links``: ``what``, claiming ``site``, came by the link named for it, or
        was published on this broker if none is named.

        Raises:
            Forged: it came another way.
        """
        if not self.site_links:
            return
        expected = self.site_links.get(site)
        if via == expected:
            return
        came = f"came by the federation link from {via}" if via else "was published here"
        where = f"behind the link from {expected}" if expected else "on this broker"
        raise Forged(
            f"{what} claims site {site!r} but {came}, and site {site!r} is {where} "
            "(OBJSTREAM_SITE_LINKS)"
        )

    def check_answer(
        self, what: str, site: str, routing_key: str, user: str | None, via: str | None = None
    ) -> None:
        """Check that an answer (``progress``, ``done``, ``reply``, or an offer or ``abort``
        to a requester) claiming ``site`` came from it: its key names ``site`` as the publisher
        and its user speaks for ``site``.

        Raises:
            Forged: it did not.
        """
        publisher = answer_publisher(routing_key)
        if publisher != site:
            raise Forged(
                f"{what} claims site {site!r} but came with key {routing_key!r}"
                + (f" of site {publisher!r}" if publisher else "")
            )
        self.check_claim(what, site, user, via)
