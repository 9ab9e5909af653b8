"""Single-use sign-in links (vmagent/api/links.py): expiry, single use, bound to one VM
and one purpose, kept as digests only."""

from __future__ import annotations

import asyncio

import pytest

from vmagent.api.links import MAX_TTL, LinkService, LinkTokens, parse_ttl
from vmagent.context import Caller, RequestContext, Role, Transport
from vmagent.errors import BadRequest, Conflict, NotFound, Unauthorized

ALICE = Caller("alice", Role.USER, token_id="t1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_link_works_once_and_gives_back_its_caller():
    links = LinkTokens()
    token = links.issue("ui", ALICE)
    link = links.redeem(token)
    assert link.caller == ALICE and link.kind == "ui" and link.vm is None
    with pytest.raises(Unauthorized, match="already used"):
        links.redeem(token)


def test_an_expired_link_is_refused_and_says_how_to_get_another():
    clock = Clock()
    links = LinkTokens(clock)
    token = links.issue("vnc", ALICE, "a1", ttl=5)
    clock.now += 4.9
    fresh = links.issue("vnc", ALICE, "a1", ttl=5)
    clock.now += 0.2                           # the first one is 5.1 s old
    with pytest.raises(Unauthorized, match=r"expired.*vmctl vnc a1"):
        links.redeem(token)
    assert links.redeem(fresh).vm == "a1"      # the other still counts


def test_a_vnc_link_is_bound_to_its_vm_and_purpose():
    links = LinkTokens()
    token = links.issue("vnc", ALICE, "a1")
    with pytest.raises(Unauthorized, match="console of VM a1"):
        links.redeem(token, vm="b1")
    token2 = links.issue("vnc", ALICE, "a1")
    with pytest.raises(Unauthorized, match="not this page"):
        links.redeem(token2, kind="ui")
    assert links.redeem(links.issue("vnc", ALICE, "a1"), "vnc", "a1").vm == "a1"


@pytest.mark.parametrize("token", ["", "vml_nope", "x" * 200, None, "vml_" + "A" * 43])
def test_unknown_tokens_are_refused(token):
    links = LinkTokens()
    links.issue("ui", ALICE)
    with pytest.raises(Unauthorized, match="not valid"):
        links.redeem(token)


def test_only_digests_are_kept_and_expired_links_go():
    clock = Clock()
    links = LinkTokens(clock)
    token = links.issue("ui", ALICE, ttl=1)
    assert token not in repr(links._links)
    clock.now += 2
    links.issue("ui", ALICE)
    assert len(links) == 1


def test_issue_checks_its_arguments():
    links = LinkTokens()
    with pytest.raises(ValueError):
        links.issue("vnc", ALICE)           # a vnc link names its VM
    with pytest.raises(ValueError):
        links.issue("ssh", ALICE)


@pytest.mark.parametrize("value,ok", [(None, 120.0), ("", 120.0), (1, 1.0), ("30", 30.0),
                                      (MAX_TTL, MAX_TTL), (0, None), (601, None),
                                      ("soon", None), (True, None), ([], None)])
def test_ttl(value, ok):
    if ok is None:
        with pytest.raises(BadRequest):
            parse_ttl(value)
    else:
        assert parse_ttl(value) == ok


def test_the_service_needs_a_tcp_listener_and_the_vm():
    svc = LinkService(LinkTokens(), lambda n: n == "a1")
    ctx = RequestContext(ALICE, Transport.UNIX)
    with pytest.raises(Conflict, match="--listen"):
        asyncio.run(svc.ui_link(ctx))
    svc.base_url = "https://h.example:8765/"
    with pytest.raises(NotFound):
        asyncio.run(svc.vnc_link(ctx, "zz"))
    doc = asyncio.run(svc.vnc_link(ctx, "a1", ttl=30))
    assert doc["url"].startswith("https://h.example:8765/ui/link/vml_")
    assert doc["expires_in"] == 30 and doc["vm"] == "a1" and doc["user"] == "alice"
    link = svc.tokens.redeem(doc["url"].rsplit("/", 1)[1])
    assert link.caller == ALICE and link.vm == "a1"
