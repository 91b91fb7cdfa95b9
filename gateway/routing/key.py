"""The placement key of a build (design.md, "Routing contract").

Order: the context-directory part of the session's sharedkey (buildx sends "<dir>:<node id>";
the node id differs per CI runner, the directory does not); then the :authority host when it is
a name rather than an address; then the client's identity (mTLS subject or address, no port);
None means no key (random placement).
"""

from __future__ import annotations

import ipaddress


def context_part(sharedkey: str) -> str:
    head, sep, _tail = sharedkey.rpartition(":")
    return head if sep else sharedkey


def authority_name(authority: str) -> str | None:
    """The host of an :authority value when it is a DNS name, else None."""
    host = authority.lower()
    if host.startswith("["):
        return None  # bracketed IPv6 literal
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    if not host or host == "localhost":
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def placement_key(*, sharedkey: str, authority: str, client: str | None) -> str | None:
    part = context_part(sharedkey)
    if part:
        return "ctx:" + part
    name = authority_name(authority)
    if name:
        return "host:" + name
    if client:
        return "client:" + client
    return None
