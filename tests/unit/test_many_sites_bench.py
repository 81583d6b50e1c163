"""The pure helpers of bench/many_sites.py: each site's user, as the broker is told of it.

The bench itself needs a throwaway broker node and many processes, so it is run by hand.
"""

from __future__ import annotations

import base64
import hashlib

from bench.many_sites import _password_hash, _split, definitions, password
from objstream.common.topology import permissions


def test_each_site_gets_objstreams_own_least_privilege() -> None:
    d = definitions(["server", "site-1"], namespace="ns")
    assert [u["name"] for u in d["users"]] == ["server", "site-1"]
    assert all(u["tags"] == [] for u in d["users"])  # no tag: none may impersonate
    for site, vhost, topic in zip(
        ["server", "site-1"], d["permissions"], d["topic_permissions"], strict=True
    ):
        p = permissions("ns", site)
        assert vhost == {"user": site, "vhost": "/", "configure": p.configure,
                         "write": p.write, "read": p.read}  # fmt: skip
        assert topic == {"user": site, "vhost": "/", "exchange": "ns",
                         "write": p.topic_write, "read": p.topic_read}  # fmt: skip


def test_password_hash_is_rabbitmqs_salted_sha256() -> None:
    raw = base64.b64decode(_password_hash(password("site-1")))
    salt, digest = raw[:4], raw[4:]
    assert digest == hashlib.sha256(salt + b"pw-site-1").digest()


def test_sites_are_dealt_to_at_most_the_processes_asked() -> None:
    sites = [f"site-{i}" for i in range(1, 65)]
    groups = _split(sites, 8)
    assert len(groups) == 8
    assert sorted(s for g in groups for s in g) == sorted(sites)
    assert _split(sites[:1], 8) == [["site-1"]]
