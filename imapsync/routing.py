"""Which vaults a message goes to, per tenant (design: "Recipient filtering"). No I/O.

Vaults = the addresses in From/To/Cc/Bcc/Delivered-To/X-Original-To on a primary
domain, mapped through that tenant's aliases, plus the owner of the mailbox being
synced. A message with no vault at all is skipped with reason no_primary_recipient.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

NO_PRIMARY_RECIPIENT = "no_primary_recipient"


@dataclass(frozen=True)
class Route:
    """The vaults of one message on one tenant, and the sender if on that domain."""

    tenant: str
    vaults: frozenset[str]
    sender: str | None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def owner_vault(username: str, vault: str | None, domains: Iterable[str]) -> str | None:
    """The account's own vault: configured, or its username when that is on a primary domain."""
    if vault:
        return vault.strip().lower()
    username = username.strip().lower()
    return username if "@" in username and domain_of(username) in set(domains) else None


def routes(addresses: Iterable[str], sender: str | None, owner: str | None,
           aliases: Mapping[str, Mapping[str, str]]) -> list[Route]:
    """Group the message's vaults by tenant domain; `aliases` is domain -> {alias: primary}."""
    by_tenant: dict[str, set[str]] = {}
    for addr in list(addresses) + ([owner] if owner else []):
        addr = addr.lower()
        domain = domain_of(addr)
        if domain not in aliases:
            continue
        addr = aliases[domain].get(addr, addr)
        target = domain_of(addr)
        if target in aliases:
            by_tenant.setdefault(target, set()).add(addr)
    out = []
    for tenant in sorted(by_tenant):
        s = sender.lower() if sender else None
        if s and domain_of(s) == tenant:
            s = aliases[tenant].get(s, s)
        out.append(Route(tenant, frozenset(by_tenant[tenant]),
                         s if s and domain_of(s) == tenant else None))
    return out
