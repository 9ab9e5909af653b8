"""Browser sessions, the shown state and the create form's parameters: pure parts of the
web UI."""

from __future__ import annotations

import pytest

from vmagent.api.ui import browser_url, forms, views
from vmagent.api.ui.sessions import SessionStore, same
from vmagent.context import Caller, Role
from vmagent.errors import BadRequest

ALICE = Caller("alice", Role.USER)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sessions_expire_when_idle_and_at_their_maximum_age():
    clock = Clock()
    store = SessionStore(clock, idle=10, max_age=25)
    s = store.create(ALICE)
    assert len(s.id) >= 43 and len(s.csrf) >= 43 and s.id != s.csrf
    clock.now = 9
    assert store.get(s.id) is s              # seen: the idle time restarts
    clock.now = 18
    assert store.get(s.id) is s
    clock.now = 26                           # past the maximum age, though not idle
    assert store.get(s.id) is None
    t = store.create(ALICE)
    clock.now += 11
    assert store.get(t.id) is None


def test_sessions_are_dropped_and_ids_are_not_guessable():
    store = SessionStore()
    a, b = store.create(ALICE), store.create(ALICE)
    assert a.id != b.id and a.csrf != b.csrf
    store.drop(a.id)
    assert store.get(a.id) is None and store.get(b.id) is b
    assert store.get(None) is None and store.get("") is None and store.get("x") is None
    assert store.drop_caller(lambda c: c.user == "alice") == 1


def test_a_vnc_session_allows_its_vm_screen_only():
    store = SessionStore()
    scoped = store.create(ALICE, vnc_only="a1")
    assert scoped.allows("a1", vnc=True)
    assert not scoped.allows("a1", vnc=False) and not scoped.allows("b1", vnc=True)
    assert not scoped.allows(None, vnc=False)
    full = store.create(ALICE)
    assert full.allows(None, False) and full.allows("b1", True)


def test_token_comparison():
    assert same("abc", "abc")
    assert not same("abc", "abd") and not same("", "") and not same(None, "x")
    assert not same("x", None)


RUNNING = {"state": "running", "ssh_ready": True}


@pytest.mark.parametrize("st,activity,shown", [
    (RUNNING, {}, "running"),
    ({"state": "stopped"}, {}, "stopped"),
    ({"state": "broken"}, {"busy": "start"}, "broken"),
    (RUNNING, {"busy": "reboot"}, "stopping"),
    (RUNNING, {"busy": "shutdown"}, "stopping"),
    (RUNNING, {"busy": "reset"}, "starting"),
    (RUNNING, {"busy": "delete"}, "deleting"),
    # after a reboot: starting until SSH answers again
    ({"state": "running", "ssh_ready": False},
     {"last": {"op": "reboot", "ok": True, "ended": 995.0}}, "starting"),
    ({"state": "running", "ssh_ready": True},
     {"last": {"op": "reboot", "ok": True, "ended": 995.0}}, "running"),
    # a guest whose SSH never answers is running after the grace
    ({"state": "running", "ssh_ready": False},
     {"last": {"op": "start", "ok": True, "ended": 1000.0 - views.BOOT_GRACE - 1}}, "running"),
    ({"state": "running", "ssh_ready": False},
     {"last": {"op": "snapshot", "ok": True, "ended": 999.0}}, "running"),
    ({"state": "running", "ssh_ready": False},
     {"last": {"op": "reboot", "ok": False, "ended": 999.0}}, "running"),
])
def test_shown_state(st, activity, shown):
    assert views.shown_state(st, activity, now=1000.0) == shown


def test_phases_follow_the_status_like_vmctl_create():
    assert not any(views.phases({"state": "starting"}).values())
    booting = views.phases({"state": "running", "boot": {"kernel": True}})
    assert booting["qemu"] and booting["kernel"] and not booting["ssh"]
    up = views.phases({"state": "running", "ssh_ready": True, "cloud_init": None})
    assert up["ssh"] and up["cloud_init"] == "not seen"
    done = views.phases({"state": "running", "ssh_ready": True, "cloud_init": "done"})
    assert done["cloud_init"] is True


def test_create_form_to_parameters():
    p = forms.create_params({"name": " d1 ", "source": "image", "image": "test", "cpus": "2",
                             "memory": "1G", "disk": "", "segment": "dev",
                             "admins": "bob, carol  dave", "ssh_key": "ssh-ed25519 AAA x\n"})
    assert p == {"name": "d1", "image": "test", "cpus": 2, "memory": "1G", "segment": "dev",
                 "admins": ["bob", "carol", "dave"], "ssh_keys": ["ssh-ed25519 AAA x"]}
    t = forms.create_params({"name": "d2", "source": "template", "template": "tpl",
                             "cpus": "4", "memory": "8G"})
    assert t == {"name": "d2", "template": "tpl"}     # a clone has its template's size
    for bad in ({"name": ""}, {"name": "x", "source": "iso"},
                {"name": "x", "source": "template"}, {"name": "x", "cpus": "two"}):
        with pytest.raises(BadRequest):
            forms.create_params(bad)


@pytest.mark.parametrize("value,to", [("/ui/vms/a1", "/ui/vms/a1"), ("/ui/", "/ui/"),
                                      ("https://evil.example/", "/ui/"), ("//evil", "/ui/"),
                                      ("/ui//evil.example", "/ui/"), ("/v1/vms", "/ui/"),
                                      (None, "/ui/"), ("/ui/\\evil", "/ui/")])
def test_after_sign_in_only_pages_of_the_ui(value, to):
    assert forms.safe_next(value) == to


def test_browser_url():
    assert browser_url("127.0.0.1", 8765, False) == "http://127.0.0.1:8765"
    assert browser_url("::1", 8765, True) == "https://[::1]:8765"
    assert browser_url("0.0.0.0", 1, False).startswith("http://") and \
        "0.0.0.0" not in browser_url("0.0.0.0", 1, False)
