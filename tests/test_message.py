"""Message parsing, keys and routing: pure code, with property tests for hostile input."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imapsync import routing
from imapsync.message import MessageInfo, addresses_in, fingerprint, header_block, normalize_message_id


def info(raw: bytes) -> MessageInfo:
    return MessageInfo.from_headers(header_block(raw), len(raw))


def test_message_id_normalisation():
    assert normalize_message_id(" <AbC.1@Example.COM> ") == "AbC.1@example.com"
    assert normalize_message_id("AbC.1@example.com") == "AbC.1@example.com"  # no brackets
    assert normalize_message_id("<abc 1@example.com>") == "abc1@example.com"  # spaces
    assert normalize_message_id("") is None and normalize_message_id("<>") is None


def test_sent_and_received_copies_share_a_key_but_reused_ids_do_not():
    base = b"Message-ID: <x@a.example>\r\nFrom: a@acme.com\r\nSubject: s\r\nDate: Mon, 5 Jan 2026 08:00:00 +0000\r\n"
    sent = base + b"\r\nbody"
    received = b"Received: by mx\r\nDelivered-To: b@acme.com\r\n" + base + b"\r\nbody"
    assert info(sent).header_key == info(received).header_key
    other = base.replace(b"Subject: s", b"Subject: another message") + b"\r\nbody"
    assert info(other).header_key != info(sent).header_key  # a broken mailer reusing the ID


def test_fingerprint_ignores_trace_headers_only():
    raw = b"From: a@x.example\r\nSubject: s\r\n\r\nbody"
    assert fingerprint(b"Received: by a\r\n\tfolded\r\nReturn-Path: <a@x>\r\n" + raw) == fingerprint(raw)
    assert fingerprint(raw + b"!") != fingerprint(raw)


def test_addresses_use_the_real_address_not_the_display_name():
    i = info(b'From: "a@acme.com" <evil@x.example>\r\nTo: evil@x.example <b@acme.com>\r\n\r\n')
    assert i.sender == "evil@x.example"
    assert "a@acme.com" not in i.addresses


def test_routes_group_vaults_by_tenant_with_aliases_and_owner():
    aliases = {"acme.com": {"a.smith@acme.com": "alice@acme.com"}, "beta.org": {}}
    rts = routing.routes(["A.Smith@acme.com", "x@beta.org", "y@gamma.net"], "x@beta.org", "owner@acme.com", aliases)
    assert rts == [routing.Route("acme.com", frozenset({"alice@acme.com", "owner@acme.com"}), None),
                   routing.Route("beta.org", frozenset({"x@beta.org"}), "x@beta.org")]
    assert routing.routes(["y@gamma.net"], None, None, aliases) == []


def test_owner_vault_defaults_to_username_on_a_primary_domain():
    assert routing.owner_vault("Bob@Acme.com", None, ["acme.com"]) == "bob@acme.com"
    assert routing.owner_vault("info@partner.example", None, ["acme.com"]) is None
    assert routing.owner_vault("login-name", "team@acme.com", ["acme.com"]) == "team@acme.com"


header_text = st.binary(max_size=400)


@settings(max_examples=300, deadline=None)
@given(header_text, st.binary(max_size=200))
def test_parsing_never_fails_and_keys_are_stable(headers, body):
    raw = headers + b"\r\n\r\n" + body
    a, b = info(raw), info(raw)
    assert a == b
    assert fingerprint(raw) == fingerprint(raw) and fingerprint(raw).startswith("f:")
    for addr in a.addresses:
        assert addr.count("@") == 1 and addr == addr.lower()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.emails(), max_size=5), st.sampled_from(["acme.com", "ACME.COM", "beta.org"]))
def test_every_vault_is_on_its_tenant_domain(addrs, domain):
    rts = routing.routes([a.lower() for a in addrs] + [f"x@{domain}".lower()], None, None,
                         {"acme.com": {}, "beta.org": {}})
    assert rts, "an address on a primary domain always yields a route"
    for r in rts:
        assert r.vaults and all(v.endswith("@" + r.tenant) for v in r.vaults)


# ----- issue 7: display names never route, whatever they hold --------------------------------

PRIMARY = {"acme.com": {}, "beta.org": {}}
local_parts = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True)
real_addresses = st.builds(lambda local, domain: f"{local}@{domain}", local_parts,
                           st.sampled_from(["x.example", "outside.example", "acme.com", "beta.org"]))
# Display names that look like addresses on a primary domain, or are arbitrary text.
display_names = st.one_of(
    st.builds(lambda local, d: f"{local}@{d}", local_parts, st.sampled_from(["acme.com", "beta.org", "ACME.COM"])),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters='"\\\r\n'), max_size=40))


def _quoted(name: str) -> str:
    return '"' + name + '"'


@settings(max_examples=300, deadline=None)
@given(display_names, real_addresses, st.booleans())
def test_a_display_name_is_never_taken_for_the_address(name, addr, quote):
    plain = "".join(" " if c in ',<>():;"\\' else c for c in name)  # what may stand unquoted
    shown = _quoted(name) if quote else plain
    for value in (f"{shown} <{addr}>", f"{shown}<{addr}>", f"{shown} <{addr}> (comment {plain})"):
        assert addresses_in([value]) == [addr.lower()], value


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(display_names, real_addresses), min_size=1, max_size=8), local_parts)
def test_address_lists_and_groups_yield_exactly_the_real_addresses(pairs, group):
    value = ", ".join(f"{_quoted(n)} <{a}>" for n, a in pairs)
    expected = list(dict.fromkeys(a.lower() for _, a in pairs))
    assert addresses_in([value]) == expected
    assert addresses_in([f"{group}: {value};"]) == expected  # an RFC 5322 group


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_header_text_parses_to_valid_lowercase_addresses(value):
    for addr in addresses_in([value]):
        assert addr == addr.lower() and addr.count("@") == 1 and " " not in addr and "<" not in addr


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(display_names, real_addresses), max_size=6),
       st.sampled_from([None, "owner@acme.com", "owner@beta.org"]))
def test_vaults_are_real_primary_addresses_or_the_owner_never_display_names(pairs, owner):
    raw = ("To: " + ", ".join(f"{_quoted(n)} <{a}>" for n, a in pairs) + "\r\n\r\nbody").encode()
    i = info(raw)
    rts = routing.routes(i.addresses, i.sender, owner, PRIMARY)
    real = {a.lower() for _, a in pairs} | ({owner} if owner else set())
    vaults = {v for r in rts for v in r.vaults}
    assert vaults == {a for a in real if a.rpartition("@")[2] in PRIMARY}
    for r in rts:
        assert all(v.endswith("@" + r.tenant) for v in r.vaults)
